#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for SECONDS each (default 20) and prints the runs per target.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# With cargo-fuzz installed (`cargo install cargo-fuzz`), targets are built and run with
# libFuzzer, coverage-guided, on the stable toolchain (`-s none`: no sanitizer, which needs
# nightly). Without it, or with VESSEL_FUZZ_DRIVER=1, the stable in-process driver
# (fuzz/src/bin/driver.rs: mutation without coverage feedback) runs instead.
# Each run starts from fuzz/seeds/<target> and replays fuzz/regressions/<target> (inputs that
# once crashed). Exits non-zero on a crash; the input is left in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-20}"
shift || true
target_dir="${CARGO_TARGET_DIR:-$PWD/target}/fuzz"
work="$(mktemp -d "${TMPDIR:-/tmp}/vessel-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT

all_targets() {
    sed -n 's/^name = "\([a-z_]*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^vessel_fuzz$'
}
if [ "$#" -gt 0 ]; then targets=("$@"); else mapfile -t targets < <(all_targets); fi

if [ "${VESSEL_FUZZ_DRIVER:-0}" != 1 ] && cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo fuzz (libFuzzer, -s none), ${secs} s per target"
    cargo fuzz build -s none --target-dir "$target_dir" >/dev/null 2>"$work/build.log" \
        || { cat "$work/build.log"; exit 1; }
    status=0
    for t in "${targets[@]}"; do
        mkdir -p "$work/$t"
        dirs=("$work/$t")
        for d in "fuzz/seeds/$t" "fuzz/regressions/$t"; do [ -d "$d" ] && dirs+=("$d"); done
        log="$work/$t.log"
        if ! cargo fuzz run -s none --target-dir "$target_dir" "$t" "${dirs[@]}" \
            -- -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 \
            -print_final_stats=1 >"$log" 2>&1; then
            tail -40 "$log"
            echo "$t: CRASH (input in fuzz/artifacts/$t/)"
            status=1
            continue
        fi
        runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1/p' "$log")
        time=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\2/p' "$log")
        cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
        corp=$(ls "$work/$t" | wc -l)
        printf '%-16s runs %10s  time %4s s  %s  new corpus %s\n' "$t" "$runs" "$time" "$cov" "$corp"
    done
    exit "$status"
fi

echo "stable in-process driver (no coverage feedback), ${secs} s per target"
cargo build --release --manifest-path fuzz/Cargo.toml --target-dir "$target_dir" --features driver --bin fuzz-driver \
    >/dev/null 2>"$work/build.log" || { cat "$work/build.log"; exit 1; }
exec "$target_dir/release/fuzz-driver" "$secs" "${targets[@]}"
