#!/usr/bin/env bash
# Vessel's test command (CI runs exactly this). Installs what it needs, builds the guest kit's
# `minimal` image (cached outside the repo), then runs formatting, lints and every test,
# including end-to-end boots of real Linux.
#
#   scripts/test.sh              # what CI runs
#   scripts/test.sh --extended   # also boots Debian's stock kernel and OVMF (slow on nested hosts),
#                                # tests the static release binaries (scripts/build-static.sh, both links),
#                                # and, given KATA_SHIM and KATA_AGENT, runs scripts/kata-e2e.sh
set -euo pipefail
cd "$(dirname "$0")/.."

extended=0
if [ "${1:-}" = "--extended" ]; then extended=1; fi

step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }

step "host dependencies"
scripts/install-deps.sh

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings

step "build"
cargo build --workspace --release

step "guest kit"
target/release/vessel image build minimal
if [ "$extended" = 1 ]; then target/release/vessel image build debian; fi

step "fuzzing (bounded: 10 s per target, then the regression inputs)"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
scripts/fuzz.sh 10
cargo test --release --manifest-path fuzz/Cargo.toml --test replay

step "tests"
export VESSEL_E2E=1
export VESSEL_E2E_DEBIAN="$extended"
export VESSEL_E2E_UEFI="$extended"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release -- --test-threads=2 2>&1 | tee "$log"
if [ "$extended" = 1 ]; then
    # The shipped static binaries are built another way (whole-program LTO, static glibc):
    # the drop-in's own test runs again on them.
    # Both links: position-independent (the default) and at a fixed address (--no-pie).
    for link in "" --no-pie; do
        step "static binaries (scripts/build-static.sh${link:+ $link}), the firecracker drop-in's test on them"
        static_fc=$(scripts/build-static.sh ${link:+"$link"} | tail -1)
        VESSEL_FIRECRACKER_BIN=$(readlink -f "$static_fc") \
            cargo test --release -p vessel-firecracker --test drop_in 2>&1 | tee -a "$log"
    done
fi
if [ "$extended" = 1 ] && [ -n "${KATA_SHIM:-}" ] && [ -n "${KATA_AGENT:-}" ]; then
    step "Kata Containers end to end (scripts/kata-e2e.sh)"
    scripts/kata-e2e.sh
fi
# One closing line for the whole run (cargo ends with the last crate's doc tests).
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
