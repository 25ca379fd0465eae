#!/usr/bin/env python3
"""Writes the seed inputs under fuzz/seeds/<target>/ (run from the repository root).

Seeds get the fuzzers past the first gate of each format (ELF and bzImage magic, HTTP
request lines, JSON shapes, frame headers); the fuzzers do the rest.
"""
import json, os, struct, zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def put(target, name, data):
    d = os.path.join(ROOT, target)
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
