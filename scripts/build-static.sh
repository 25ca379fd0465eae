#!/usr/bin/env bash
# Builds the release binaries to ship, `vessel` and `firecracker` (Firecracker mode alone,
# the slim drop-in), each as one static, position-independent executable (static-pie):
# glibc and libgcc linked in, address randomization kept. No dynamic loader runs at start
# and no shared libraries are mapped, so Firecracker mode answers its API sooner and keeps
# less private memory (figures: README, `cargo bench -p vessel --bench compare` with
# VESSEL_B=<this binary>), and a jail needs no libraries beside it.
#
# `--no-pie` links them at a fixed address instead (a static, non-PIE executable, what a
# prelinked binary is): the start no longer relocates the binary's pointers (vtables, string
# tables), so each process keeps about 115 KiB less private memory and answers its API about
# 0.1 ms sooner, and the binary's own code and data lose address randomization (the heap,
# stacks and mappings keep theirs). A choice for hosts that pack many microVMs and judge them
# by memory; the default keeps randomization. Built in a target directory of its own
# (`<target>/no-pie`), so the two builds do not rebuild each other.
#
# The `dist` profile (Cargo.toml) links the whole program at once (fat LTO, one codegen
# unit) and optimizes for size all but the data path (exits, the instruction emulator,
# virtqueues, devices): a VMM's resident set is mostly its mapped code, and the kernel maps
# a binary's cached pages around each one touched. Prints the binaries' paths.
#
#   scripts/build-static.sh [--no-pie] [cargo build flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
target_dir="${CARGO_TARGET_DIR:-target}"
flags="-C target-feature=+crt-static"
# What `file`'s ELF type must be: a static-pie is a shared object (ET_DYN) that relocates
# itself, a fixed-address one an executable (ET_EXEC).
elf_type=DYN
if [ "${1:-}" = "--no-pie" ]; then
    shift
    flags="$flags -C relocation-model=static"
    target_dir="$target_dir/no-pie"
    elf_type=EXEC
fi
# An explicit --target keeps the flag off build scripts and proc-macros (host artifacts),
# which cannot be linked statically.
RUSTFLAGS="${RUSTFLAGS:-} $flags" CARGO_TARGET_DIR="$target_dir" \
    cargo build --profile dist --target "$target" -p vessel -p vessel-firecracker "$@" >&2
dir="$target_dir/$target/dist"
# A static link resolves no weak reference that nothing else pulls in: such a function's
# address is 0. The standard library's optional calls (it checks for 0 and falls back) and
# glibc's own hooks are expected (among them `_dl_rtld_map`, the dynamic loader's own map,
# which glibc's relocation code only compares addresses with and declares weak so that static
# programs link; a fixed-address link leaves it unresolved); any other would crash when
# called. This cannot see a plain call merged into one of the expected weak
# declarations: link-time optimization did that to Vessel's call of glibc's `gettid`, which
# the standard library declares weak (Vessel now makes that system call itself); the
# extended tests run the drop-in's test on this build.
expected='^(_ITM_.*|__cxa_finalize|__cxa_thread_atexit_impl|__gmon_start__|_dl_rtld_map|_nl_current_LC_.*_used|copy_file_range|statx|gettid|pidfd_getpid|pidfd_spawnp|posix_spawn_file_actions_addchdir(_np)?)$'
for b in vessel firecracker; do
    weak=$(nm "$dir/$b" | awk '$1 ~ /^[wv]$/ {print $2}' | grep -Ev "$expected" || true)
    if [ -n "$weak" ]; then
        echo "build-static: $b calls functions no static link resolves: $weak" >&2
        exit 1
    fi
    type=$(readelf -h "$dir/$b" | awk '$1 == "Type:" {print $2}')
    if [ "$type" != "$elf_type" ]; then
        echo "build-static: $b is an ELF $type, not $elf_type" >&2
        exit 1
    fi
    echo "$dir/$b"
done
