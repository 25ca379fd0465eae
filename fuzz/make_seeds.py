#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/seeds/<target>/, and the reconstructed inputs of past
findings under fuzz/regressions/<target>/ (run from anywhere).

Seeds get the fuzzers past the first gate of each format (ELF and bzImage magic, HTTP
request lines, JSON shapes, frame headers, well-formed virtqueue requests); the fuzzers do
the rest. A crashing input found later goes into regressions/ as the fuzzer saved it.
"""
import json, os, struct, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "seeds")


def put(target, name, data, root=ROOT):
    d = os.path.join(root, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# An ELF64 x86-64 executable with one PT_LOAD at 16 MiB and a PVH note.
def elf(entry=0x1000000, with_note=True):
    code = b"\xf4" * 64
    phnum = 2 if with_note else 1
    ehsize, phsize = 64, 56
    off = ehsize + phsize * phnum
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    code_off = off + len(note)
    hdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    hdr += struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, entry, ehsize, 0, 0, ehsize, phsize, phnum, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x1000000, 0x1000000, len(code), len(code) + 0x1000, 0x1000)
    if with_note:
        ph += struct.pack("<IIQQQQQQ", 4, 4, off, 0, 0, len(note), len(note), 4)
    return hdr + ph + note + code


def bzimage(payload=b"", compressed=b""):
    setup_sects = 1
    img = bytearray(512 * (1 + setup_sects))
    img[0x1F1] = setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x020F)  # protocol version
    img[0x211] = 0x01  # loadflags: LOADED_HIGH
    struct.pack_into("<I", img, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", img, 0x22C, 0x7FFFFFFF)  # initrd_addr_max
    struct.pack_into("<I", img, 0x230, 0x200000)  # kernel_alignment
    img[0x234] = 1  # relocatable
    struct.pack_into("<H", img, 0x236, 0x1 | 0x2)  # xloadflags: 64-bit entry
    struct.pack_into("<I", img, 0x238, 256)  # cmdline_size
    body = bytearray(0x200) + compressed
    struct.pack_into("<I", img, 0x248, 0x200)  # payload_offset
    struct.pack_into("<I", img, 0x24C, len(compressed))  # payload_length
    struct.pack_into("<I", img, 0x260, 0x400000)  # init_size
    return bytes(img) + bytes(body)


put("boot_loader", "elf-pvh", elf())
put("boot_loader", "elf-plain", elf(with_note=False))
put("boot_loader", "bzimage-empty", bzimage())
gz = zlib.compressobj(9, zlib.DEFLATED, 31)
put("boot_loader", "bzimage-gzip-elf", bzimage(compressed=gz.compress(elf()) + gz.flush()))

reqs = {
    "get-root": "GET / HTTP/1.1\r\n\r\n",
    "put-boot": 'PUT /boot-source HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 58\r\n\r\n{"kernel_image_path": "/nonexistent", "boot_args": "ro"}\r\n',
    "put-machine": 'PUT /machine-config HTTP/1.1\r\nContent-Length: 34\r\n\r\n{"vcpu_count": 2, "mem_size_mib": 8}',
    "put-drive": 'PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 86\r\n\r\n{"drive_id":"rootfs","path_on_host":"/nonexistent","is_root_device":true,"is_read_only":false}',
    "patch-vm": 'PATCH /vm HTTP/1.1\r\nContent-Length: 20\r\n\r\n{"state": "Paused"}\r\n',
    "start-pipelined": 'PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{"action_type": "InstanceStart"}\r\nGET /vm/config HTTP/1.1\r\n\r\nPATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\n\r\n{"amount_mib": 4}',
    "mmds": 'PUT /mmds HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 24\r\n\r\n{"latest": {"a": [1,2]}}',
    "net": 'PUT /network-interfaces/eth0 HTTP/1.1\r\nContent-Length: 60\r\n\r\n{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}',
}
for k, v in reqs.items():
    put("api_request", k, v)

cfg = {
    "boot-source": {"kernel_image_path": "/nonexistent/vmlinux", "boot_args": "console=ttyS0"},
    "drives": [{"drive_id": "rootfs", "path_on_host": "/nonexistent", "is_root_device": True, "is_read_only": True,
                "rate_limiter": {"bandwidth": {"size": 100, "one_time_burst": 10, "refill_time": 100}}}],
    "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": False},
    "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}],
    "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
    "balloon": {"amount_mib": 0, "deflate_on_oom": True, "stats_polling_interval_s": 1},
    "entropy": {},
    "mmds-config": {"network_interfaces": ["eth0"], "version": "V2"},
}
put("config_file", "full", json.dumps(cfg))
put("config_file", "minimal-with-metadata", json.dumps({"boot-source": {"kernel_image_path": "/x"}}) + "\0" + '{"a": {"b": "c"}}')

put("snapshot_state", "empty-object", "{}")
put("snapshot_state", "partial", json.dumps({"kind": "vessel-vm", "version": 1, "config": {}, "vcpus": [], "devices": []}))


def frame(kind, payload):
    return bytes([kind]) + struct.pack("<Q", len(payload)) + payload


put("snapshot_frame", "stream", frame(1, b'{"version":1}') + frame(2, struct.pack("<Q", 0x1000) + b"\0" * 64) + frame(3, b"{}") + frame(4, b"") + frame(5, b"oops"))

# emulate: register state bytes then an instruction (mov [rbx], eax; rep movsb; cmpxchg; ...).
for i, insn in enumerate([b"\x89\x03", b"\xf3\xa4", b"\x0f\xb1\x0b", b"\x0f\x01\xf9", b"\xf3\x0f\xc7\xf8", b"\x48\xa5", b"\xcc", b"\x0f\x0b"]):
    put("emulate", f"insn-{i}", bytes([2]) + bytes(16 * 8 + 8 + 4 + 4 + 1 + 1) + bytes([len(insn)]) + insn + bytes(64))


# --- virtio_* targets --------------------------------------------------------------------
# The input is decoded with `arbitrary` into `devices::Input` (fuzz/src/devices.rs); these
# helpers write that encoding: integers little-endian, a bool is a byte (bit 0), an Option a
# bool then the value, a Vec each element behind a "one more" byte 1, ended by a 0.
# Guest memory of the harness: queue i at 0x3000 * (i + 1) (descriptors, available ring,
# used ring one page each); `fill` at DATA. Descriptor flags: 1 NEXT, 2 WRITE, 4 INDIRECT.
DATA = 0x80000
NEXT, WRITE, INDIRECT = 1, 2, 4


def vec(items, enc):
    return b"".join(b"\x01" + enc(i) for i in items) + b"\x00"


def u8s(bs):
    return vec(bs, lambda b: bytes([b]))


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<IHBB", addr, length, flags, nxt)


def queue(descs=(), avail=(), bogus_avail_idx=None, disabled=False):
    out = vec(descs, lambda d: d) + u8s(avail)
    out += b"\x00" if bogus_avail_idx is None else b"\x01" + struct.pack("<H", bogus_avail_idx)
    return out + bytes([int(disabled)])


def device_input(features, queues, fill=b"", config_writes=(), rekicks=0):
    """`queues`: one `queue(...)` per device queue, in the device's order."""
    out = struct.pack("<Q", features)
    out += vec(config_writes, lambda cw: bytes([cw[0]]) + u8s(cw[1]))
    out += vec(queues, lambda q: q)
    return out + bytes([rekicks]) + u8s(fill)


def chains(*chain_list):
    """Descriptor chains laid out one after the other: each chain a list of
    (addr, len, flags); NEXT links are added. Returns (descs, heads)."""
    descs, heads = [], []
    for chain in chain_list:
        heads.append(len(descs))
        for k, (addr, length, flags) in enumerate(chain):
            last = k == len(chain) - 1
            descs.append(desc(addr, length, flags | (0 if last else NEXT), len(descs) + 1))
    return descs, heads


ALL = (1 << 64) - 1

# virtio-blk: one request queue. Headers (type, reserved, sector) in `fill`, data buffers
# and status bytes above it.
blk_hdr = lambda t, sector: struct.pack("<IIQ", t, 0, sector)
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES = 0, 1, 4, 8, 11, 13
fill = blk_hdr(IN, 0) + blk_hdr(OUT, 1) + blk_hdr(FLUSH, 0) + blk_hdr(GET_ID, 0)
fill += blk_hdr(DISCARD, 0) + blk_hdr(WRITE_ZEROES, 0)
fill += struct.pack("<QII", 8, 8, 0)  # one discard / write-zeroes segment at DATA + 96
d, h = chains(
    [(DATA, 16, 0), (0x90000, 512, WRITE), (0x9f000, 1, WRITE)],
    [(DATA + 16, 16, 0), (0x91000, 1024, 0), (0x9f001, 1, WRITE)],
    [(DATA + 32, 16, 0), (0x9f002, 1, WRITE)],
    [(DATA + 48, 16, 0), (0x92000, 20, WRITE), (0x9f003, 1, WRITE)],
    [(DATA + 64, 16, 0), (DATA + 96, 16, 0), (0x9f004, 1, WRITE)],
    [(DATA + 80, 16, 0), (DATA + 96, 16, 0), (0x9f005, 1, WRITE)],
)
put("virtio_block", "requests", device_input(ALL, [queue(d, h)], fill))
# The same read through an indirect table (in `fill`), and a second kick.
table = desc(DATA, 16, NEXT, 1) + desc(0x90000, 4096, WRITE | NEXT, 2) + desc(0x9f000, 1, WRITE)
fill = blk_hdr(IN, 2).ljust(64, b"\0") + table
put("virtio_block", "indirect", device_input(1 << 28 | 1 << 29, [queue([desc(DATA + 64, 48, INDIRECT)], [0])], fill, rekicks=1))

# virtio-net: rx0, tx0. A frame to send (virtio_net_hdr_v1, then an ARP request); receive
# buffers stay available (nothing arrives on the TAP).
net_hdr = bytes(12)
arp = bytes.fromhex("ffffffffffff" "060000000001" "0806" "0001080006040001" "060000000001" "0a000002" "000000000000" "0a000001")
fill = net_hdr + arp
d_rx, h_rx = chains([(0x90000, 1526, WRITE)], [(0x91000, 1526, WRITE)])
d_tx, h_tx = chains([(DATA, 12, 0), (DATA + 12, len(arp), 0)], [(DATA, 12 + len(arp), 0)])
put("virtio_net", "tx-arp", device_input(1 << 15 | 1 << 5 | 1 << 16, [queue(d_rx, h_rx), queue(d_tx, h_tx)], fill))
put("virtio_net", "tx-offloads", device_input(ALL, [queue(d_rx, h_rx), queue(d_tx, h_tx)], fill, rekicks=2))

# virtio-vsock: rx, tx, event. Packets from the guest (CID 3) to the host (CID 2): a
# connection request to a port nobody serves (answered with a reset on rx), data and a
# credit request for connections that do not exist, a shutdown.
def vsock_pkt(op, dst_port=5000, payload=b""):
    hdr = struct.pack("<QQIIIHHIII", 3, 2, 1234, dst_port, len(payload), 1, op, 0, 65536, 0)
    return hdr + payload

REQUEST, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = 1, 3, 4, 5, 6, 7
pkts = [vsock_pkt(REQUEST), vsock_pkt(RW, payload=b"hello"), vsock_pkt(CREDIT_REQUEST), vsock_pkt(SHUTDOWN), vsock_pkt(RST)]
fill, tx_chains, at = b"", [], DATA
for p in pkts:
    tx_chains.append([(at, 44, 0)] + ([(at + 44, len(p) - 44, 0)] if len(p) > 44 else []))
    fill += p.ljust(64, b"\0")
    at += 64
d_rx, h_rx = chains(*[[(0x90000 + 0x1000 * i, 4096, WRITE)] for i in range(4)])
d_tx, h_tx = chains(*tx_chains)
d_ev, h_ev = chains([(0x98000, 4, WRITE)])
put("virtio_vsock", "packets", device_input(ALL, [queue(d_rx, h_rx), queue(d_tx, h_tx), queue(d_ev, h_ev)], fill))
put("virtio_vsock", "request-then-rekick", device_input(1 << 32, [queue(d_rx, h_rx), queue(d_tx, h_tx[:1]), queue()], fill, rekicks=3))

# virtio-rng: buffers of every size to fill, one split over two descriptors.
d, h = chains([(0x90000, 16, WRITE)], [(0x91000, 4096, WRITE)], [(0x92000, 100, WRITE), (0x93000, 60000, WRITE)], [(0x9f000, 1, WRITE)])
put("virtio_rng", "buffers", device_input(ALL, [queue(d, h)]))
put("virtio_rng", "one-buffer-rekicked", device_input(1 << 32, [queue(d[:1], [0])], rekicks=3))

# virtio-pmem: flush requests (a 4-byte type 0, then a 4-byte status to write), one of an
# unknown type, and one whose status descriptor is missing.
fill = struct.pack("<II", 0, 7)
d, h = chains([(DATA, 4, 0), (0x90000, 4, WRITE)], [(DATA + 4, 4, 0), (0x90010, 4, WRITE)], [(DATA, 4, 0)])
put("virtio_pmem", "flushes", device_input(ALL, [queue(d, h)], fill))
put("virtio_pmem", "flush-rekicked", device_input(1 << 32, [queue(d[:2], [0])], fill, rekicks=3))

# virtio-balloon: inflate and deflate page frame numbers (pages of the harness's guest
# memory), statistics (tag, value), free page reports. Features: STATS_VQ, DEFLATE_ON_OOM,
# FREE_PAGE_REPORTING.
pfns = struct.pack("<8I", *range(0xa0, 0xa8))
stats = b"".join(struct.pack("<HQ", tag, 1000 * tag) for tag in range(10))
fill = pfns + stats
inflate = chains([(DATA, len(pfns), 0)], [(DATA, 8, 0)])
deflate = chains([(DATA, 16, 0)])
stats_q = chains([(DATA + len(pfns), len(stats), 0)])
report = chains([(0xb0000, 0x4000, WRITE)], [(0xb8000, 0x1000, WRITE)])
features = 1 << 1 | 1 << 2 | 1 << 5 | 1 << 32
put("virtio_balloon", "inflate-deflate-stats-report", device_input(features, [queue(*inflate), queue(*deflate), queue(*stats_q), queue(*report)], fill, config_writes=[(4, [0x10, 0, 0, 0])]))
put("virtio_balloon", "inflate-only", device_input(1 << 32, [queue(*inflate), queue()], fill, rekicks=1))

# virtio-console: receiveq0 (buffers stay: nothing is typed), transmitq0 with output; a
# write to emerg_wr.
text = b"hello from the console seed\n"
d_rx, h_rx = chains([(0x90000, 256, WRITE)])
d_tx, h_tx = chains([(DATA, len(text), 0)], [(DATA, 5, 0), (DATA + 5, len(text) - 5, 0)])
put("virtio_console", "output", device_input(ALL, [queue(d_rx, h_rx), queue(d_tx, h_tx)], text, config_writes=[(8, [ord("!"), 0, 0, 0])]))
put("virtio_console", "output-rekicked", device_input(1 << 32, [queue(), queue(d_tx[:1], [0])], text, rekicks=2))

# qcow2_open: small images made by qemu-img (512-byte clusters keep them a few KiB): a v3
# image with data, a v2 image, and an overlay naming a backing file that does not exist.
import subprocess, tempfile
with tempfile.TemporaryDirectory() as tmp:
    def qcow2(name, *args):
        path = os.path.join(tmp, name)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *args[:-1], path, args[-1]], check=True)
        return path
    def qemu_io(path, cmd):
        subprocess.run(["qemu-io", "-c", cmd, path], check=True, stdout=subprocess.DEVNULL)
    v3 = qcow2("v3", "-o", "cluster_size=512", "64K")
    qemu_io(v3, "write -P 0x5a 1024 2048")
    v2 = qcow2("v2", "-o", "cluster_size=512,compat=0.10", "64K")
    overlay = qcow2("overlay", "-o", "cluster_size=512", "-F", "raw", "-b", "/nonexistent/base.raw", "-u", "64K")
    for name, path in [("v3-with-data", v3), ("v2-empty", v2), ("overlay-missing-backing", overlay)]:
        with open(path, "rb") as f:
            put("qcow2_open", name, f.read())

# boot_config: a Debian cloud image's grub.cfg (trimmed, with a submenu) and a BLS entry.
put("boot_config", "grub-debian", """set default="1>0"
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple' {
\tsearch --no-floppy --fs-uuid --set=root 1234-abcd
\tlinux\t/boot/vmlinuz-6.1.0-28-cloud-amd64 root=PARTUUID=5678 ro console=ttyS0,115200 $vt_handoff
\tinitrd\t/boot/initrd.img-6.1.0-28-cloud-amd64
}
submenu 'Advanced options' {
\tmenuentry 'Debian, with Linux 6.1.0-27' {
\t\tlinux\t/boot/vmlinuz-6.1.0-27-cloud-amd64 root=PARTUUID=5678 ro single
\t\tinitrd\t/boot/initrd.img-6.1.0-27-cloud-amd64 /boot/extra.img
\t}
}
""")
put("boot_config", "bls-entry", "title Fedora Linux (6.11.4)\nversion 6.11.4\nlinux /vmlinuz-6.11.4\ninitrd /initramfs-6.11.4.img\noptions root=UUID=1 ro\n")

# disk_scan: small disk images booted directly, made with dosfstools' mkfs.fat, mtools' mcopy,
# util-linux's sfdisk and e2fsprogs' mkfs.ext4 (fixed ids and times, so that the same seeds
# come out each run, except for the ext4 inodes' change times, which mkfs.ext4 -d copies):
# a bare FAT12 filesystem laid out as systemd-boot's ESP (loader entries, kernels under the
# machine id), the same in a GPT partition beside an ESP holding GRUB's stub and a full
# grub.cfg, an MBR partition, and a bare ext4 with a grub.cfg.
with tempfile.TemporaryDirectory() as tmp:
    def tree(name, files):
        root = os.path.join(tmp, name)
        for path, data in files.items():
            p = os.path.join(root, path)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode())
        for d, dirs, names in os.walk(root):
            for n in dirs + names:
                os.utime(os.path.join(d, n), (1000000000, 1000000000))
        return root

    def fat(name, kib, root):
        img = os.path.join(tmp, name)
        subprocess.run(["mkfs.fat", "--invariant", "-C", img, str(kib)], check=True, stdout=subprocess.DEVNULL)
        entries = [os.path.join(root, e) for e in sorted(os.listdir(root))]
        subprocess.run(["mcopy", "-m", "-s", "-i", img, *entries, "::/"], check=True)
        with open(img, "rb") as f:
            return f.read()

    def partitioned(name, label, parts):
        """A disk with `parts` (sfdisk type, filesystem bytes) from sector 40, 34 sectors spare at the end."""
        img = os.path.join(tmp, name)
        script, at = [f"label: {label}", "label-id: 0x12345678" if label == "dos" else "label-id: 01234567-89AB-CDEF-0123-456789ABCDEF"], 40
        for i, (kind, fs) in enumerate(parts):
            uuid = "" if label == "dos" else f", uuid=01234567-89AB-CDEF-0123-45678900000{i}"
            script.append(f"start={at}, size={len(fs) // 512}, type={kind}{uuid}")
            at += len(fs) // 512
        with open(img, "wb") as f:
            f.truncate((at + 34) * 512)
        subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", img],
                       input="\n".join(script).encode(), check=True, stdout=subprocess.DEVNULL)
        with open(img, "r+b") as f:
            at = 40
            for _, fs in parts:
                f.seek(at * 512)
                f.write(fs)
                at += len(fs) // 512
        with open(img, "rb") as f:
            return f.read()

    bls = fat("bls.img", 64, tree("bls", {
        "loader/entries/0123abcd-6.10.0.conf": "title Old Linux\nlinux /0123abcd/6.10.0/linux\n",
        "loader/entries/0123abcd-6.11.4.conf": "title Fedora Linux (6.11.4)\nlinux /0123abcd/6.11.4/linux\ninitrd /0123abcd/6.11.4/initrd\noptions root=UUID=1 ro quiet\n",
        "0123abcd/6.10.0/linux": b"OLD-KERNEL",
        "0123abcd/6.11.4/linux": b"KERNEL" * 1000,
        "0123abcd/6.11.4/initrd": b"INITRD" * 200,
    }))
    put("disk_scan", "fat12-loader-entries", bls)
    esp = fat("esp.img", 64, tree("esp", {
        "EFI/debian/grub.cfg": "search.fs_uuid 0123 root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n",
        "EFI/fedora/grub.cfg": "set default=\"0\"\nmenuentry 'Fedora' {\n\tlinuxefi /vmlinuz-6.11 root=LABEL=root\n\tinitrdefi /initramfs-6.11.img\n}\n",
        "vmlinuz-6.11": b"K" * 3000,
        "initramfs-6.11.img": b"I" * 700,
    }))
    put("disk_scan", "gpt-esp-grub", partitioned("gpt.img", "gpt", [
        ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", esp),
        ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", bls),
    ]))
    put("disk_scan", "mbr-fat", partitioned("mbr.img", "dos", [("ef", bls)]))
    root = tree("root", {
        "boot/grub/grub.cfg": "menuentry 'Debian GNU/Linux' {\n\tlinux /boot/vmlinuz root=/dev/vda1 ro\n\tinitrd /boot/initrd.img\n}\n",
        "boot/vmlinuz": b"KERNEL" * 100,
        "boot/initrd.img": b"INITRD" * 50,
    })
    ext4 = os.path.join(tmp, "root.ext4")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-N", "16", "-O", "^has_journal,^resize_inode",
                    "-U", "01234567-89ab-cdef-0123-456789abcdef", "-E", "root_owner=0:0,hash_seed=01234567-89ab-cdef-0123-456789abcdef",
                    "-d", root, ext4, "128k"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": "1000000000"})
    with open(ext4, "rb") as f:
        put("disk_scan", "ext4-grub", f.read())

# fw_cfg: operations on the device (fuzz/src/targets.rs, `fw_cfg`): an opcode byte, then its
# operands, little-endian. Files, sorted: 0x20 bootorder, 0x21 etc/acpi/tables (5000 bytes),
# 0x22 etc/e820; guest memory 0..0x10000 and 0x20000..0x30000.
FW_SELECT, FW_READ, FW_WRITE, FW_PREAD, FW_DMA, FW_POKE = range(6)
DMA_ERR, DMA_READ, DMA_SKIP, DMA_SEL, DMA_WRITE = 1, 2, 4, 8, 16


def fw_dma(desc, control, length, address, how=0):
    return bytes([FW_DMA]) + struct.pack("<IIIQB", desc, control, length, address, how)


def fw_sel(key):
    return key << 16 | DMA_SEL


put("fw_cfg", "ports", bytes([FW_SELECT, 0, 0, FW_READ, 4, FW_SELECT, 0x19, 0, FW_READ, 200])
    + bytes([FW_PREAD, 4, 3, FW_PREAD, 8, 2, FW_SELECT, 0x21, 0x40, FW_READ, 16])
    + bytes([FW_WRITE, 1, 0]) + bytes(8) + bytes([FW_WRITE, 0, 0]) + bytes(8))
put("fw_cfg", "dma",
    fw_dma(0x1000, fw_sel(0x19) | DMA_READ, 4 + 3 * 64, 0x2000)
    + fw_dma(0x1000, fw_sel(0x20) | DMA_READ, 16, 0x3000, how=1)
    + fw_dma(0x1000, fw_sel(0x21) | DMA_SKIP, 100, 0)
    + fw_dma(0x1000, DMA_READ, 100, 0x4000)
    + fw_dma(0x1000, DMA_READ, 0x200, 0xff00)  # straddles the hole: error
    + fw_dma(0x1000, fw_sel(0x22) | DMA_WRITE, 20, 0x5000))
put("fw_cfg", "dma-hostile",
    fw_dma(0x1000, fw_sel(0x21) | DMA_READ, 0xFFFFFFFF, 0x2000)
    + fw_dma(0x1000, fw_sel(0x21) | DMA_READ, 0xF000, 0x21000)
    + fw_dma(0x1fff8, DMA_READ, 16, 0x2000)
    + fw_dma(0x2000, DMA_READ, 16, 0x2000, how=2)
    + fw_dma(0xFFFFFFF8, DMA_READ | DMA_SKIP | DMA_WRITE, 16, (1 << 64) - 8, how=3)
    + bytes([FW_POKE]) + struct.pack("<IB", 0x1000, 4) + struct.pack(">I", fw_sel(0x19) | DMA_READ)
    + bytes([FW_WRITE, 8, 2]) + struct.pack("<I", 0x00100000) + bytes(4))

# --- regressions: reconstructed inputs of past findings -----------------------------------
REG = os.path.join(HERE, "regressions")

# virtio_vsock: an available index far ahead of the tx ring breaks the device; the extra
# kicks after that must still be taken (the worker used to leave them pending and spin).
put("virtio_vsock", "broken-ring-then-kicks",
    device_input(1 << 32, [queue(), queue(bogus_avail_idx=1000), queue()], rekicks=3), root=REG)

# snapshot_frame: a 9-byte header announcing the largest allowed frame (64 MiB), then a
# few bytes: read_frame used to allocate the announced length before reading any.
put("snapshot_frame", "huge-announced-length", bytes([2]) + struct.pack("<Q", 64 << 20) + b"\x01" * 100, root=REG)

# disk_scan: an MBR whose one used entry starts at sector 0: `mbrman`, which read MBRs then,
# panicked (unwrap of an empty range while guessing the alignment).
mbr = bytearray(1024)
mbr[446 + 4] = 0x01
mbr[510:512] = b"\x55\xaa"
put("disk_scan", "mbr-entry-at-sector-0", bytes(mbr), root=REG)
