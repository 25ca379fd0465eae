#!/bin/sh
# virtio-fs throughput: the kit's `minimal` guest writes and reads a file sequentially in a
# host directory shared with `--fs tag=bench,dir=...` (a virtiofsd Vessel starts), with `dd`
# (1 MiB blocks, conv=fsync on the write, the guest's page cache dropped before the read);
# then the host does the same in the same directory. Prints MB/s for each, and the ratio.
#
#   benches/virtiofs.sh [SIZE_MIB] [VESSEL_BINARY]
#
# On a nested host that emulates guest kernel mode (this project's lab) the guest's side is
# bound by the emulation, not by virtio-fs: compare runs on the same host only.
set -eu
cd "$(dirname "$0")/.."
SIZE=${1:-32}
VESSEL=${2:-target/release/vessel}
[ -x "$VESSEL" ] || cargo build --release -q -p vessel
out=$("$VESSEL" image build minimal 2>/dev/null)
kernel=$(echo "$out" | sed -n 's/^kernel=//p')
initrd=$(echo "$out" | sed -n 's/^initrd=//p')
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/files" "$tmp/share"
cat >"$tmp/files/vessel-run" <<EOF
mkdir -p /share && mount -t virtiofs bench /share || exit 1
now() { awk '{ printf "%.0f", \$1 * 1000000000 }' /proc/uptime; }
t0=\$(now)
dd if=/dev/zero of=/share/guest.bin bs=1M count=$SIZE conv=fsync 2>/dev/null
t1=\$(now)
echo 3 > /proc/sys/vm/drop_caches
t2=\$(now)
dd if=/share/guest.bin of=/dev/null bs=1M 2>/dev/null
t3=\$(now)
echo "BENCH-WRITE-NS \$((t1 - t0))"
echo "BENCH-READ-NS \$((t3 - t2))"
umount /share
EOF
truncate -s 16M "$tmp/disk.ext4"
mkfs.ext4 -q -F -d "$tmp/files" "$tmp/disk.ext4"
"$VESSEL" run --kernel "$kernel" --initrd "$initrd" --memory 256M --append vessel.poweroff \
    --disk "path=$tmp/disk.ext4" --fs "tag=bench,dir=$tmp/share" \
    --serial "file=$tmp/console" 2>"$tmp/stderr" || { tail -n 5 "$tmp/stderr"; exit 1; }
gw=$(sed -n 's/^BENCH-WRITE-NS //p' "$tmp/console" | tr -d '\r')
gr=$(sed -n 's/^BENCH-READ-NS //p' "$tmp/console" | tr -d '\r')
[ -n "$gw" ] && [ -n "$gr" ] || { echo "the guest did not report"; tail -n 20 "$tmp/console"; exit 1; }

now_ns() { date +%s%N; }
t0=$(now_ns)
dd if=/dev/zero of="$tmp/share/host.bin" bs=1M count="$SIZE" conv=fsync 2>/dev/null
t1=$(now_ns)
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
t2=$(now_ns)
dd if="$tmp/share/host.bin" of=/dev/null bs=1M 2>/dev/null
t3=$(now_ns)
hw=$((t1 - t0)); hr=$((t3 - t2))

mbps() { awk -v mib="$SIZE" -v ns="$1" 'BEGIN { printf "%.1f", mib * 1.048576 / (ns / 1e9) }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
echo "virtio-fs sequential write ($SIZE MiB, fsync): guest $(mbps "$gw") MB/s, host $(mbps "$hw") MB/s, guest/host $(ratio "$gw" "$hw")"
echo "virtio-fs sequential read  ($SIZE MiB, cold):  guest $(mbps "$gr") MB/s, host $(mbps "$hr") MB/s, guest/host $(ratio "$gr" "$hr")"
