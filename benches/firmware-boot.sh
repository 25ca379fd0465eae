#!/bin/sh
# Firmware boot milestones on this host: time from `vessel run --firmware bios` to SeaBIOS's
# banner, to GRUB, to the kernel's first line, to VESSEL-GUEST-READY and to power-off, on
# the disk scripts/make-boot-disk.sh builds (the kit's minimal kernel and initramfs), and
# the same disk booted directly (no firmware) for comparison; with `--uefi`, also through
# OVMF (its boot manager loading GRUB's BOOTX64.EFI; about 10 minutes on a host that
# emulates guest kernel mode). Prints one line per milestone.
#
#   benches/firmware-boot.sh [--uefi] [VESSEL_BINARY]
set -eu
cd "$(dirname "$0")/.."
uefi=0
if [ "${1:-}" = "--uefi" ]; then uefi=1; shift; fi
VESSEL=${1:-target/release/vessel}
[ -x "$VESSEL" ] || cargo build --release -q -p vessel
out=$("$VESSEL" image build minimal)
bz=$(echo "$out" | sed -n 's/^bzimage=//p')
initrd=$(echo "$out" | sed -n 's/^initrd=//p')
params=$("$VESSEL" image kernel-params)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/vessel/images/boot-disk
cmdline="console=ttyS0 reboot=k panic=1 i8042.noaux 8250.nr_uarts=1 random.trust_bootloader=on vessel.poweroff $params"
sh scripts/make-boot-disk.sh "$bz" "$initrd" "$cache" "$cmdline" >/dev/null
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

now_ms() { date +%s%3N; }

# run_milestones LABEL ARGS...: starts vessel, polls its console every 20 ms.
run_milestones() {
    label=$1; shift
    qemu-img create -q -f qcow2 -F qcow2 -b "$cache/base.qcow2" "$tmp/disk.qcow2"
    : >"$tmp/console"
    t0=$(now_ms)
    "$VESSEL" run --memory 256M --disk "path=$tmp/disk.qcow2" "$@" \
        --serial "file=$tmp/console" 2>"$tmp/stderr" &
    pid=$!
    seen=""
    while kill -0 "$pid" 2>/dev/null; do
        for m in "SeaBIOS" "GRUB loading" "BdsDxe: loading" "Welcome to GRUB" "Booting \`Vessel minimal'" "Linux version" "Run /init" "VESSEL-GUEST-READY"; do
            case "$seen" in *"|$m|"*) continue ;; esac
            if grep -qF "$m" "$tmp/console" 2>/dev/null; then
                echo "$label: $m after $(( $(now_ms) - t0 )) ms"
                seen="$seen|$m|"
            fi
        done
        sleep 0.02
    done
    wait "$pid" || true
    echo "$label: exited after $(( $(now_ms) - t0 )) ms ($(tail -n1 "$tmp/stderr"))"
}

run_milestones "seabios+grub" --firmware bios --stats
run_milestones "direct" --stats
if [ "$uefi" = 1 ]; then
    run_milestones "ovmf+grub" --firmware uefi --firmware-vars "$tmp/vars.fd" --stats
fi
