#!/bin/sh
# passt (`--net user`) TCP throughput, both ways, with the kit's `minimal` guest and busybox
# `nc` in it (iperf3 is not in that guest): guest -> host, the guest sends SIZE MiB to a
# sink on the host's loopback (through the gateway address, as a guest reaches the host);
# host -> guest, the host sends SIZE MiB to the guest's `nc -l` through a forwarded port
# (`hostfwd=tcp:PORT:5001`). The host side times each transfer (first byte to the end,
# and connect to the guest's close) and prints MB/s; the host's own loopback is the scale.
#
#   benches/passt.sh [SIZE_MIB] [VESSEL_BINARY]
#
# On a nested host that emulates guest kernel mode (this project's lab) the guest's TCP
# stack is what limits both figures: compare runs on the same host only.
set -eu
cd "$(dirname "$0")/.."
SIZE=${1:-4}
VESSEL=${2:-target/release/vessel}
command -v passt >/dev/null || { echo "passt is not installed (apt-get install passt)"; exit 1; }
[ -x "$VESSEL" ] || cargo build --release -q -p vessel
out=$("$VESSEL" image build minimal 2>/dev/null)
kernel=$(echo "$out" | sed -n 's/^kernel=//p')
initrd=$(echo "$out" | sed -n 's/^initrd=//p')
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK=$(free_port)
FWD=$(free_port)

# The host's side: a sink for the guest's upload, then an upload into the guest.
cat >"$tmp/host.py" <<EOF
import socket, sys, time
size = $SIZE << 20
sink = socket.create_server(("127.0.0.1", $SINK))
conn, _ = sink.accept()
got, first = 0, None
while True:
    b = conn.recv(1 << 20)
    if not b:
        break
    first = first or time.monotonic()
    got += len(b)
up = (got, time.monotonic() - first)
# The guest listens once its upload is done; a connection before that is reset: retry.
while True:
    while "BENCH-LISTENING" not in open("$tmp/console", errors="replace").read():
        time.sleep(0.2)
    try:
        c = socket.create_connection(("127.0.0.1", $FWD))
        t0 = time.monotonic()
        chunk = b"\0" * (1 << 16)
        for _ in range(size // len(chunk)):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        while c.recv(1 << 16):
            pass
        down = (size, time.monotonic() - t0)
        break
    except (ConnectionResetError, BrokenPipeError):
        time.sleep(1)
print(f"{up[0]} {up[1]:.6f} {down[0]} {down[1]:.6f}")
EOF
python3 "$tmp/host.py" >"$tmp/host.out" &
host=$!

mkdir -p "$tmp/files"
cat >"$tmp/files/vessel-run" <<EOF
cat > /tmp/up.sh <<'EOS'
#!/bin/sh
[ "\$1" = bound ] || exit 0
ip addr add \$ip/\$mask dev \$interface
ip route add default via \$router
echo \$router > /tmp/gw
EOS
chmod +x /tmp/up.sh
ip link set eth0 up
busybox udhcpc -i eth0 -q -n -t 10 -s /tmp/up.sh
dd if=/dev/zero bs=64k count=$((SIZE * 16)) 2>/dev/null | nc \$(cat /tmp/gw) $SINK
echo BENCH-LISTENING
for i in 1 2 3 4 5; do
    nc -l -p 5001 > /tmp/got
    [ "\$(wc -c < /tmp/got)" -ge $((SIZE << 20)) ] && break
done
echo "BENCH-RECEIVED \$(wc -c < /tmp/got)"
EOF
truncate -s 16M "$tmp/disk.ext4"
mkfs.ext4 -q -F -d "$tmp/files" "$tmp/disk.ext4"
"$VESSEL" run --kernel "$kernel" --initrd "$initrd" --memory 256M --append vessel.poweroff \
    --disk "path=$tmp/disk.ext4" --net "user,hostfwd=tcp:$FWD:5001" \
    --serial "file=$tmp/console" 2>"$tmp/stderr" || { tail -n 5 "$tmp/stderr"; exit 1; }
wait $host || { echo "the host side failed"; tail -n 20 "$tmp/console"; exit 1; }
read -r ub us db ds <"$tmp/host.out"

# The host's loopback, for scale.
lo=$(python3 - <<EOF
import socket, threading, time
size = $SIZE << 20
s = socket.create_server(("127.0.0.1", 0))
port = s.getsockname()[1]
def sink():
    c, _ = s.accept()
    while c.recv(1 << 20):
        pass
t = threading.Thread(target=sink); t.start()
c = socket.create_connection(("127.0.0.1", port)); t0 = time.monotonic()
chunk = b"\0" * (1 << 16)
for _ in range(size // len(chunk)):
    c.sendall(chunk)
c.close(); t.join()
print(f"{time.monotonic() - t0:.6f}")
EOF
)
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", b / 1e6 / s }'; }
echo "passt TCP guest -> host ($SIZE MiB): $(mbps "$ub" "$us") MB/s"
echo "passt TCP host -> guest ($SIZE MiB, forwarded port): $(mbps "$db" "$ds") MB/s"
echo "host loopback, same transfer: $(mbps $((SIZE << 20)) "$lo") MB/s"
