#!/bin/sh
# Builds a disk image laid out like a distribution cloud image, for Vessel's
# firmware-boot (SeaBIOS / OVMF) end-to-end tests, without loop devices,
# mounts or root: everything is written into regular files.
#
#   scripts/make-boot-disk.sh BZIMAGE INITRD OUTDIR [CMDLINE]
#
# BZIMAGE and INITRD are a kernel bzImage and its initramfs (for instance
# `bzimage=` and `initrd=` printed by `vessel image build minimal`). CMDLINE is
# written verbatim into grub.cfg's `linux` line (GRUB's quoting rules apply);
# its default boots the minimal initramfs to VESSEL-GUEST-READY and powers off.
#
# The disk (GPT, 512-byte sectors):
#   partition 1  BIOS boot partition (1 MiB): GRUB i386-pc core.img
#   partition 2  EFI system partition (FAT): /EFI/BOOT/BOOTX64.EFI (GRUB x86_64-efi)
#   partition 3  Linux root, ext4 (label vessel-root): /boot/vmlinuz-minimal,
#                /boot/initrd.img-minimal, /boot/grub/grub.cfg
# The MBR holds GRUB's boot.img (keeping the protective MBR's partition table),
# set up the way grub-setup (util/setup.c) does for a GPT disk with a BIOS boot
# partition. Both GRUB images have every module they need built in and an
# embedded config that finds the root file system by UUID, so at run time GRUB
# reads nothing but /boot/grub/grub.cfg, the kernel and the initrd.
#
# Outputs in OUTDIR (stdout gets one KEY=PATH line each; logs go to stderr):
#   base_raw=OUTDIR/base.raw      the raw disk
#   base_qcow2=OUTDIR/base.qcow2  the same disk as qcow2
#   disk=OUTDIR/disk.qcow2        a qcow2 overlay whose backing file is
#                                 base.qcow2 (relative name, qcow2 format)
# A rerun with the same inputs (kernel, initrd, command line, this script and
# the installed GRUB) does nothing: OUTDIR/stamp holds their sha256. The
# overlay is made only when missing or when the base is rebuilt; for a
# pristine writable disk of your own, run
#   qemu-img create -f qcow2 -F qcow2 -b OUTDIR/base.qcow2 NEW.qcow2
#
# Needs (Debian packages): grub-common grub-pc-bin grub-efi-amd64-bin fdisk
# dosfstools mtools e2fsprogs qemu-utils coreutils; scripts/install-deps.sh
# installs them. GRUB_LIB overrides /usr/lib/grub.
set -eu

DEFAULT_CMDLINE="console=ttyS0 reboot=k panic=1 i8042.noaux 8250.nr_uarts=1 random.trust_bootloader=on vessel.poweroff"

log() {
    echo "make-boot-disk: $*" >&2
}

die() {
    log "error: $*"
    exit 1
}

usage() {
    echo "usage: $0 BZIMAGE INITRD OUTDIR [CMDLINE]" >&2
    exit 2
}

[ $# -ge 3 ] && [ $# -le 4 ] || usage
BZIMAGE=$1
INITRD=$2
OUTDIR=$3
CMDLINE=${4-$DEFAULT_CMDLINE}

[ -f "$BZIMAGE" ] || die "no kernel at $BZIMAGE"
[ -f "$INITRD" ] || die "no initrd at $INITRD"
case $CMDLINE in
*'
'*) die "CMDLINE must be one line" ;;
esac

GRUB_LIB=${GRUB_LIB:-/usr/lib/grub}
PC_DIR=$GRUB_LIB/i386-pc
EFI_DIR=$GRUB_LIB/x86_64-efi

# --- Tools -------------------------------------------------------------------
PATH=$PATH:/usr/sbin:/sbin
export PATH

need() { # program package
    command -v "$1" >/dev/null 2>&1 ||
        die "'$1' not found: install the Debian package $2 (sh scripts/install-deps.sh)"
}
need grub-mkimage grub-common
need sfdisk fdisk
need mkfs.vfat dosfstools
need mmd mtools
need mcopy mtools
need mkfs.ext4 e2fsprogs
need qemu-img qemu-utils
need sha256sum coreutils
need truncate coreutils
need dd coreutils
need od coreutils
[ -f "$PC_DIR/boot.img" ] && [ -f "$PC_DIR/linux.mod" ] ||
    die "no GRUB i386-pc files in $PC_DIR: install the Debian package grub-pc-bin"
[ -f "$EFI_DIR/linux.mod" ] ||
    die "no GRUB x86_64-efi files in $EFI_DIR: install the Debian package grub-efi-amd64-bin"

# --- Cache -------------------------------------------------------------------
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SELF=$0
[ -f "$SELF" ] || SELF=$(command -v "$0")

# Serialise concurrent runs on the same OUTDIR (flock is in util-linux).
if command -v flock >/dev/null 2>&1 && [ -z "${MAKE_BOOT_DISK_LOCKED-}" ]; then
    MAKE_BOOT_DISK_LOCKED=1 exec flock "$OUTDIR/.lock" sh "$SELF" "$@"
fi

grub_version() {
    dpkg-query -W -f='${Package} ${Version}\n' grub-common grub-pc-bin grub-efi-amd64-bin 2>/dev/null ||
        grub-mkimage --version
}

# Everything the disk depends on.
KEY=$(
    {
        echo "make-boot-disk 1"
        sha256sum <"$SELF"
        sha256sum <"$BZIMAGE"
        sha256sum <"$INITRD"
        printf 'cmdline=%s\n' "$CMDLINE"
        grub_version
    } | sha256sum | cut -d' ' -f1
)

emit() {
    echo "base_raw=$OUTDIR/base.raw"
    echo "base_qcow2=$OUTDIR/base.qcow2"
    echo "disk=$OUTDIR/disk.qcow2"
}

make_overlay() {
    rm -f "$OUTDIR/.disk.qcow2.tmp"
    # A relative backing file name: OUTDIR can be moved as a whole.
    (cd "$OUTDIR" && qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 .disk.qcow2.tmp)
    mv -f "$OUTDIR/.disk.qcow2.tmp" "$OUTDIR/disk.qcow2"
}

if [ -f "$OUTDIR/stamp" ] && [ "$(cat "$OUTDIR/stamp")" = "$KEY" ] &&
    [ -f "$OUTDIR/base.raw" ] && [ -f "$OUTDIR/base.qcow2" ]; then
    if [ ! -f "$OUTDIR/disk.qcow2" ]; then
        make_overlay
    fi
    log "up to date in $OUTDIR"
    emit
    exit 0
fi

# --- Layout ------------------------------------------------------------------
MIB=1048576
SECTOR=512
mib_of() { # bytes -> MiB, rounded up
    echo $((($1 + MIB - 1) / MIB))
}
size_of() {
    wc -c <"$1" | tr -d ' '
}

BZ_SIZE=$(size_of "$BZIMAGE")
INITRD_SIZE=$(size_of "$INITRD")
BIOS_MIB=1
ESP_MIB=32
# The files plus 16 MiB of slack (ext4 metadata and journal included).
ROOT_MIB=$(($(mib_of "$BZ_SIZE") + $(mib_of "$INITRD_SIZE") + 16))
# 1 MiB before the first partition (MBR, GPT header and entries), 1 MiB after
# the last one for the backup GPT.
DISK_MIB=$((1 + BIOS_MIB + ESP_MIB + ROOT_MIB + 1))

SPM=$((MIB / SECTOR)) # sectors per MiB
BIOS_LBA=$SPM
BIOS_SECTORS=$((BIOS_MIB * SPM))
ESP_LBA=$((BIOS_LBA + BIOS_SECTORS))
ESP_SECTORS=$((ESP_MIB * SPM))
ROOT_LBA=$((ESP_LBA + ESP_SECTORS))
ROOT_SECTORS=$((ROOT_MIB * SPM))

# Fixed identifiers: the same inputs give the same layout.
DISK_GUID=5645534c-0000-4000-8000-000000000000
ROOT_PARTUUID=5645534c-0000-4000-8000-000000000003
ROOT_UUID=5645534c-0000-4000-8000-0000000000e4 # the ext4 file system
ESP_VOLID=5645534c

BIOS_BOOT_TYPE=21686148-6449-6E6F-744E-656564454649
ESP_TYPE=C12A7328-F81F-11D2-BA4B-00A0C93EC93B
LINUX_TYPE=0FC63DAF-8483-4772-8E79-3D69D8477DE4

WORK=$(mktemp -d "$OUTDIR/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
trap 'exit 1' INT TERM

# Writes VALUE as an NBYTES little-endian integer at byte OFFSET of FILE.
put_le() { # file offset nbytes value
    _bytes=""
    _i=0
    while [ "$_i" -lt "$3" ]; do
        _bytes="$_bytes\\$(printf '%03o' $((($4 >> (8 * _i)) & 255)))"
        _i=$((_i + 1))
    done
    # shellcheck disable=SC2059 # the octal escapes are the format
    printf "$_bytes" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}

# Reads the NBYTES little-endian integer at byte OFFSET of FILE.
get_le() { # file offset nbytes
    _v=0
    _shift=0
    for _b in $(od -An -tu1 -j "$2" -N "$3" "$1"); do
        _v=$((_v + (_b << _shift)))
        _shift=$((_shift + 8))
    done
    echo "$_v"
}

# --- GRUB images -------------------------------------------------------------
# The embedded config: find the root file system by UUID (the disk need not
# be hd0); the -p prefix below is the fallback. normal.mod then reads
# $prefix/grub.cfg.
cat >"$WORK/early.cfg" <<EOF
search --no-floppy --fs-uuid --set=root $ROOT_UUID
set prefix=(\$root)/boot/grub
EOF

# What grub.cfg uses: serial console, terminal_*, linux/initrd, menus; ext2
# reads ext4. The `linux` module is the 32-bit boot protocol loader (linux16
# would be the 16-bit one).
COMMON_MODS="part_gpt ext2 search search_fs_uuid normal configfile linux serial terminal echo test boot"
PREFIX="(hd0,gpt3)/boot/grub"

log "grub-mkimage i386-pc"
# shellcheck disable=SC2086
grub-mkimage -d "$PC_DIR" -O i386-pc -c "$WORK/early.cfg" -p "$PREFIX" \
    -o "$WORK/core.img" biosdisk $COMMON_MODS
log "grub-mkimage x86_64-efi"
# shellcheck disable=SC2086
grub-mkimage -d "$EFI_DIR" -O x86_64-efi -c "$WORK/early.cfg" -p "$PREFIX" \
    -o "$WORK/BOOTX64.EFI" $COMMON_MODS fat efi_gop

CORE_SIZE=$(size_of "$WORK/core.img")
CORE_SECTORS=$(((CORE_SIZE + SECTOR - 1) / SECTOR))
# setup.c: at most 0xFFFF sectors, and what fits below 0x78000 from 0x8200
# (the load address); and it must fit the BIOS boot partition.
CORE_MAX=$(((0x78000 - 0x8200) / SECTOR))
[ "$CORE_SECTORS" -le "$CORE_MAX" ] && [ "$CORE_SECTORS" -le "$BIOS_SECTORS" ] ||
    die "core.img is $CORE_SECTORS sectors, more than the $CORE_MAX GRUB can load"
# Pad to whole sectors (setup.c zeroes the tail the same way).
truncate -s $((CORE_SECTORS * SECTOR)) "$WORK/core.img"

# core.img starts with diskboot.img, whose first block list entry is the
# last 12 bytes of its sector (include/grub/offsets.h struct
# grub_pc_bios_boot_blocklist: u64 start, u16 len, u16 segment; diskboot.S
# `firstlist`, GRUB_BOOT_MACHINE_LIST_SIZE 12). The entry below it must stay a
# zero terminator. As setup.c's save_blocklists does for a contiguous image:
# start = the sector after diskboot, len = the rest, segment = 0x800 + 0x20
# (GRUB_BOOT_I386_PC_KERNEL_SEG + 512 >> 4).
[ "$(get_le "$WORK/core.img" 0x1f4 8)" -eq 2 ] && [ "$(get_le "$WORK/core.img" 0x1fe 2)" -eq $((0x820)) ] ||
    die "core.img's first sector is not GRUB 2 diskboot.img (block list defaults not found)"
[ "$(get_le "$WORK/core.img" 0x1e8 8)" -eq 0 ] && [ "$(get_le "$WORK/core.img" 0x1f0 4)" -eq 0 ] ||
    die "core.img has no zero block list terminator"
put_le "$WORK/core.img" $((0x1f4)) 8 $((BIOS_LBA + 1))
put_le "$WORK/core.img" $((0x1fc)) 2 $((CORE_SECTORS - 1))
put_le "$WORK/core.img" $((0x1fe)) 2 $((0x820))

# --- EFI system partition ----------------------------------------------------
log "ESP: mkfs.vfat ${ESP_MIB} MiB"
mkfs.vfat -C -n ESP -i "$ESP_VOLID" "$WORK/esp.img" $((ESP_MIB * 1024)) >/dev/null
MTOOLS_SKIP_CHECK=1
export MTOOLS_SKIP_CHECK
mmd -i "$WORK/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$WORK/esp.img" "$WORK/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

# --- Root file system ----------------------------------------------------------
mkdir -p "$WORK/root/boot/grub"
cp "$BZIMAGE" "$WORK/root/boot/vmlinuz-minimal"
cp "$INITRD" "$WORK/root/boot/initrd.img-minimal"
cat >"$WORK/root/boot/grub/grub.cfg" <<EOF
# Made by Vessel's scripts/make-boot-disk.sh.
serial --unit=0 --speed=115200
terminal_input serial
terminal_output serial
set timeout=0
set timeout_style=hidden
set default=0

menuentry 'Vessel minimal' {
    echo 'Loading Vessel minimal...'
    linux /boot/vmlinuz-minimal $CMDLINE
    initrd /boot/initrd.img-minimal
}
EOF
log "root: mkfs.ext4 ${ROOT_MIB} MiB"
truncate -s $((ROOT_MIB * MIB)) "$WORK/root.img"
mkfs.ext4 -q -F -b 4096 -L vessel-root -U "$ROOT_UUID" -E root_owner=0:0 \
    -d "$WORK/root" "$WORK/root.img"

# --- The disk ------------------------------------------------------------------
log "disk: ${DISK_MIB} MiB GPT"
DISK=$WORK/base.raw
truncate -s $((DISK_MIB * MIB)) "$DISK"
sfdisk -q --no-reread --no-tell-kernel "$DISK" >/dev/null <<EOF
label: gpt
label-id: $DISK_GUID
unit: sectors
first-lba: 34
start=$BIOS_LBA, size=$BIOS_SECTORS, type=$BIOS_BOOT_TYPE, uuid=5645534c-0000-4000-8000-000000000001, name="BIOS boot"
start=$ESP_LBA, size=$ESP_SECTORS, type=$ESP_TYPE, uuid=5645534c-0000-4000-8000-000000000002, name="EFI system"
start=$ROOT_LBA, size=$ROOT_SECTORS, type=$LINUX_TYPE, uuid=$ROOT_PARTUUID, name="root"
EOF
dd if="$WORK/core.img" of="$DISK" bs=$SECTOR seek="$BIOS_LBA" conv=notrunc status=none
dd if="$WORK/esp.img" of="$DISK" bs=$SECTOR seek="$ESP_LBA" conv=notrunc status=none
dd if="$WORK/root.img" of="$DISK" bs=$SECTOR seek="$ROOT_LBA" conv=notrunc status=none

# The MBR, as setup.c writes it: boot.img, but the disk's own bytes where it
# keeps them (the BPB at 0x03..0x5a; the NT magic and partition table at
# 0x1b8..0x1fe, here the protective MBR) and the 0x55aa signature. Then
# (include/grub/i386/pc/boot.h) KERNEL_SECTOR (0x5c, u64) = core.img's first
# sector, BOOT_DRIVE (0x64) = 0xff (use the drive the BIOS passes in %dl), and
# for a hard disk the 2-byte jmp at DRIVE_CHECK (0x66) becomes two NOPs.
[ "$(get_le "$PC_DIR/boot.img" 0x1fe 2)" -eq $((0xaa55)) ] || die "$PC_DIR/boot.img is not a boot sector"
[ "$(get_le "$DISK" 0x1fe 2)" -eq $((0xaa55)) ] || die "sfdisk wrote no protective MBR"
dd if="$PC_DIR/boot.img" of="$DISK" bs=1 count=3 conv=notrunc status=none
dd if="$PC_DIR/boot.img" of="$DISK" bs=1 skip=$((0x5a)) seek=$((0x5a)) count=$((0x1b8 - 0x5a)) \
    conv=notrunc status=none
put_le "$DISK" $((0x5c)) 8 "$BIOS_LBA"
put_le "$DISK" $((0x64)) 1 $((0xff))
put_le "$DISK" $((0x66)) 2 $((0x9090))

# The partition table must have survived, and the partitions be where we put them.
sfdisk --dump "$DISK" >"$WORK/table" 2>/dev/null || die "sfdisk cannot read back the partition table"
grep -q "start= *$ROOT_LBA, size= *$ROOT_SECTORS, type=$LINUX_TYPE" "$WORK/table" ||
    die "unexpected partition table: $(cat "$WORK/table")"

log "qemu-img convert -O qcow2"
qemu-img convert -q -f raw -O qcow2 "$DISK" "$WORK/base.qcow2"

# Into place: the stamp goes last, so an interrupted run rebuilds.
rm -f "$OUTDIR/stamp" "$OUTDIR/disk.qcow2"
mv -f "$DISK" "$OUTDIR/base.raw"
mv -f "$WORK/base.qcow2" "$OUTDIR/base.qcow2"
make_overlay
echo "$KEY" >"$OUTDIR/.stamp.tmp"
mv -f "$OUTDIR/.stamp.tmp" "$OUTDIR/stamp"
log "built in $OUTDIR (kernel $BZ_SIZE bytes, initrd $INITRD_SIZE bytes, core.img $CORE_SECTORS sectors)"
emit
