#!/usr/bin/env bash
# Kata Containers on Vessel, end to end (an extended test; root, slow on nested hosts):
#
#   KATA_SHIM=/path/containerd-shim-kata-v2 KATA_AGENT=/path/kata-agent scripts/kata-e2e.sh
#
# (VESSEL=/path/vessel, FIRECRACKER=/path/firecracker: the binaries to use; by default the
# release build's `vessel`, for both the guest kit and the VMM.)
#
# runs `ctr run --runtime io.containerd.kata.v2 IMAGE echo ...` with Debian's containerd and
# Kata's runtime-rs driving Vessel as its `firecracker`, and passes when the container's output
# comes back from inside the Vessel microVM. Kata's own binaries (runtime-rs's shim and
# kata-agent, 4.0) are built from Kata's repository outside this one and passed in; everything
# else is Debian's or Vessel's:
# - containerd 1.7 (Debian 13's package, unpacked here, not installed): its `blockfile`
#   snapshotter gives each container an ext4 image file, which Kata hands to the VM as a block
#   device (Firecracker has no shared file system, and this host has no device-mapper);
# - the guest kernel: `vessel image build kata` (linux-source-6.1, guest/kata.config);
# - the guest's root: an ext4 image with kata-agent as init and the libraries it links;
# - the container image: Debian's busybox-static in an OCI archive made here, imported with
#   `ctr images import` (no registry is needed).
# Work files and logs: ${VESSEL_KATA_WORK:-~/.cache/vessel/kata-e2e}; the guest's console is in
# console.log there.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

die() { echo "kata-e2e: $*" >&2; exit 1; }
step() { printf '== %s (%s)\n' "$*" "$(date +%H:%M:%S)"; }
[ "$(id -u)" = 0 ] || die "needs root (containerd, loop devices)"
[ -x "${KATA_SHIM:-}" ] || die "KATA_SHIM must name Kata's containerd-shim-kata-v2 (runtime-rs)"
[ -x "${KATA_AGENT:-}" ] || die "KATA_AGENT must name Kata's kata-agent"

work=${VESSEL_KATA_WORK:-$HOME/.cache/vessel/kata-e2e}
timeout_s=${VESSEL_KATA_TIMEOUT:-1800}
mkdir -p "$work/bin"
start=$(date +%s)

step "vessel"
vessel=${VESSEL:-$repo/target/release/vessel}
[ -x "$vessel" ] || cargo build --release -p vessel
paths=$("$vessel" image build kata)
kernel=$(sed -n 's/^kernel=//p' <<< "$paths")
[ -f "$kernel" ] || die "no kata kernel after 'vessel image build kata'"
guest_kernel=$(sed -n 's/^kernel.release=//p' "$(dirname "$kernel")/stamp")
# Kata starts `path --api-sock SOCK`; the wrapper keeps the guest's console (stdout) in a file.
# FIRECRACKER names the VMM Kata runs instead of `vessel` (the `firecracker` drop-in binary).
cat > "$work/bin/firecracker" <<EOF
#!/bin/sh
exec "${FIRECRACKER:-$vessel}" "\$@" >> "$work/console.log"
EOF
chmod +x "$work/bin/firecracker"
ln -sf "$(readlink -f "$KATA_SHIM")" "$work/bin/containerd-shim-kata-v2"

step "containerd 1.7 (Debian 13's package)"
ctrd=$work/containerd-pkg/usr/bin
if [ ! -x "$ctrd/containerd" ]; then
    apt_dir=$work/apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$apt_dir/sources.list"
    apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
        -o "APT::Sandbox::User=root")
    apt-get "${apt_opts[@]}" -q update >/dev/null
    (cd "$apt_dir" && apt-get "${apt_opts[@]}" -q download containerd busybox-static >/dev/null)
    dpkg-deb -x "$apt_dir"/containerd_*.deb "$work/containerd-pkg"
    dpkg-deb -x "$apt_dir"/busybox-static_*.deb "$work/busybox-pkg"
fi
"$ctrd/containerd" --version

step "guest root with kata-agent as init"
groot=$work/guest-root
rm -rf "$groot"
mkdir -p "$groot"/{sbin,etc,proc,sys,dev,run,tmp,lib,lib64,usr/lib,var}
ln -s ../run "$groot/var/run" # the agent keeps its state there; the root is read-only
strip -o "$groot/sbin/init" "$KATA_AGENT"
for lib in $(ldd "$KATA_AGENT" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
    cp -L --parents "$lib" "$groot"
done
echo kata > "$groot/etc/hostname"
# An MBR with one partition from 1 MiB: Kata boots root=/dev/vda1.
rootfs=$work/kata-rootfs.img
rm -f "$rootfs"
truncate -s 256M "$rootfs"
echo 'start=2048, type=83' | sfdisk -q "$rootfs"
mkfs.ext4 -q -F -E offset=1048576 -d "$groot" "$rootfs" 255M

step "container image (Debian's busybox-static as an OCI archive)"
oci=$work/oci
rm -rf "$oci" "$work/layer"
mkdir -p "$oci/blobs/sha256" "$work/layer/bin"
busybox=$(find "$work/busybox-pkg" -type f -path '*bin/busybox' | head -n 1)
[ -n "$busybox" ] || die "busybox-static's package has no bin/busybox"
cp "$busybox" "$work/layer/bin/busybox"
for applet in sh echo cat uname; do ln -s busybox "$work/layer/bin/$applet"; done
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/layer" -cf "$work/layer.tar" bin
blob() { # FILE -> "sha256:<hex> <size>", stored in the layout
    local hex size
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    cp "$1" "$oci/blobs/sha256/$hex"
    echo "sha256:$hex $size"
}
read -r layer_digest layer_size < <(blob "$work/layer.tar")
printf '{"architecture":"amd64","os":"linux","config":{"Cmd":["/bin/sh"]},"rootfs":{"type":"layers","diff_ids":["%s"]}}' \
    "$layer_digest" > "$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%s}]}' \
    "$config_digest" "$config_size" "$layer_digest" "$layer_size" > "$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")
image=vessel.test/busybox:latest
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"latest"}}]}' \
    "$manifest_digest" "$manifest_size" "$image" > "$oci/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
tar -C "$oci" -cf "$work/image.tar" oci-layout index.json blobs

step "Kata's configuration (runtime-rs, Firecracker driver, Vessel as firecracker)"
cat > "$work/configuration.toml" <<EOF
[hypervisor.firecracker]
path = "$work/bin/firecracker"
valid_hypervisor_paths = ["$work/bin/firecracker"]
jailer_path = ""
valid_jailer_paths = []
kernel = "$kernel"
image = "$rootfs"
rootfs_type = "ext4"
kernel_params = "console=ttyS0 agent.log=debug agent.log_vport=1025"
default_vcpus = 1
default_maxvcpus = 1
default_memory = 256
default_maxmemory = 2048
memory_slots = 10
default_bridges = 1
block_device_driver = "virtio-blk-mmio"
shared_fs = "none"
entropy_source = "/dev/urandom"
network_queues = 1
disable_seccomp = false

[agent.kata]
# Guest kernel code is emulated on nested hosts: the agent can take minutes to listen.
dial_timeout_ms = 500
reconnect_timeout_ms = $((timeout_s * 1000))
create_container_timeout = $timeout_s

[runtime]
enable_debug = true
name = "virt_container"
hypervisor_name = "firecracker"
agent_name = "kata"
internetworking_model = "tcfilter"
disable_guest_seccomp = true
static_sandbox_resource_mgmt = true
sandbox_cgroup_only = true
EOF

step "containerd"
# runtime-rs logs only to the systemd journal: without journald, a small reader on its socket
# keeps the messages in kata.log.
journal=/run/systemd/journal/socket
if ! pgrep -x systemd-journal >/dev/null; then
    mkdir -p "$(dirname "$journal")"
    rm -f "$journal"
    python3 -u -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
out = open(sys.argv[2], "a")
while True:
    fields = dict(l.split("=", 1) for l in s.recv(1 << 20).decode(errors="replace").splitlines() if "=" in l)
    out.write(fields.get("MESSAGE", "") + "\n")
    out.flush()
' "$journal" "$work/kata.log" &
    journal_pid=$!
fi
state=$work/containerd
if [ -S "$state/containerd.sock" ]; then pkill -f "$ctrd/containerd --config" || true; sleep 1; fi
# The blockfile snapshots live in a loop-free directory; each is a copy of this scratch ext4.
rm -rf "$state"
mkdir -p "$state"
truncate -s 128M "$state/scratch.ext4"
mkfs.ext4 -q -F "$state/scratch.ext4"
cat > "$state/config.toml" <<EOF
version = 2
root = "$state/root"
state = "$state/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$state/containerd.sock"
[plugins."io.containerd.snapshotter.v1.blockfile"]
  root_path = "$state/blockfile"
  scratch_file = "$state/scratch.ext4"
  fs_type = "ext4"
  mount_options = []
EOF
PATH="$work/bin:$ctrd:$PATH" "$ctrd/containerd" --config "$state/config.toml" --log-level debug \
    > "$work/containerd.log" 2>&1 &
ctrd_pid=$!
trap 'kill $ctrd_pid ${journal_pid:-} 2>/dev/null || true; [ -z "${journal_pid:-}" ] || rm -f "$journal"' EXIT
for _ in $(seq 100); do [ -S "$state/containerd.sock" ] && break; sleep 0.1; done
ctr() { "$ctrd/ctr" -a "$state/containerd.sock" "$@"; }
ctr images import --snapshotter blockfile "$work/image.tar"

step "ctr run (the guest boots; minutes on a nested host)"
: > "$work/console.log"
run_start=$(date +%s)
want="hello from a Vessel microVM"
out=$(timeout "$timeout_s" "$ctrd/ctr" -a "$state/containerd.sock" run --rm \
    --snapshotter blockfile --runtime io.containerd.kata.v2 \
    --runtime-config-path "$work/configuration.toml" \
    "$image" "kata-e2e-$$" /bin/sh -c "echo $want; uname -r" 2>&1) || {
    echo "$out"
    echo "--- last console lines ($work/console.log):"
    tail -n 30 "$work/console.log"
    die "ctr run failed after $(($(date +%s) - run_start)) s; logs: $work/containerd.log, $work/kata.log"
}
echo "$out"
printf '%s\n' "$out" | grep -qx "$want" || die "the container's output lacks '$want'"
printf '%s\n' "$out" | grep -qx "$guest_kernel" || die "uname -r is not the kata kernel ($guest_kernel)"
echo "kata-e2e: ok: ctr run took $(($(date +%s) - run_start)) s (whole script $(($(date +%s) - start)) s)"
