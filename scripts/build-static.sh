#!/usr/bin/env bash
# Builds `vessel` as one static, position-independent executable (static-pie): glibc and
# libgcc linked in, address randomization kept. No dynamic loader runs at start and no shared
# libraries are mapped, so Firecracker mode answers its API sooner and keeps less private
# memory (figures: README, `cargo bench -p vessel --bench compare` with VESSEL_B=<this
# binary>), and a jail needs no libraries beside it. Prints the binary's path.
#
#   scripts/build-static.sh [cargo build flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
target=x86_64-unknown-linux-gnu
# An explicit --target keeps the flag off build scripts and proc-macros (host artifacts),
# which cannot be linked statically.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --target "$target" -p vessel "$@" >&2
echo "${CARGO_TARGET_DIR:-target}/$target/release/vessel"
