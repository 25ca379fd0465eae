#!/bin/sh
# Installs the Debian packages Vessel's guest kit needs to build its images
# (`vessel image build debian|minimal`) and to run its tests.
# Idempotent and quiet: packages already present are skipped by apt.
#
#   build-essential  gcc, make, libc headers: compiling the minimal kernel
#   bc flex bison    the kernel build's own code generators (timeconst, kconfig)
#   libelf-dev       objtool (x86_64 ORC unwinder / stack validation) links libelf
#   xz-utils         unpacks linux-source-6.1's .tar.xz
#   binutils         strip / objcopy
#   dpkg apt         dpkg-deb -x and apt-get download fetch and unpack .debs
#   e2fsprogs        mkfs.ext4 and debugfs: the ext4 disk images the virtio tests boot with
#   iproute2         ip: the TAP device of the virtio-net test
#   iputils-ping     ping: the host pings the guest in the virtio-net test
#   qemu-utils       qemu-img: makes and checks the qcow2 images the block tests use
#   lz4              the minimal kernel's bzImage is LZ4-compressed (make bzImage runs lz4)
#   grub-pc-bin      GRUB's i386-pc modules and boot.img: BIOS boot of scripts/make-boot-disk.sh's disk
#   grub-efi-amd64-bin  GRUB's x86_64-efi modules: its UEFI boot (BOOTX64.EFI)
#   mtools dosfstools   mkfs.vfat, mmd, mcopy: the disk's EFI system partition, without mounting
#   fdisk            sfdisk: partitions that disk image (GPT) as a regular file
#   seabios ovmf     the BIOS and UEFI firmware the VMM boots those disks with
#   passt            user-mode networking (--net user, --net passt) and its tests
#   qemu-system-common  qemu-storage-daemon: the vhost-user-blk backend of the vhost-user test
#   libseccomp-dev libcap-ng-dev pkg-config
#                    what `cargo install virtiofsd` links (virtio-fs, --fs): Debian 12 has no
#                    virtiofsd package, so it is built from crates.io into
#                    ~/.cache/vessel/tools/virtiofsd (where Vessel looks for it), once
set -eu

PACKAGES="build-essential bc flex bison libelf-dev xz-utils binutils dpkg apt e2fsprogs iproute2 iputils-ping qemu-utils lz4 grub-pc-bin grub-efi-amd64-bin mtools dosfstools fdisk seabios ovmf passt qemu-system-common libseccomp-dev libcap-ng-dev pkg-config"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

missing_packages() {
    missing=""
    for p in $PACKAGES; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
            missing="$missing $p"
        fi
    done
}

install() {
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null; then
        # Package lists may be missing (fresh container): refresh once and retry.
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    fi
}

missing_packages
if [ -z "$missing" ]; then
    echo "install-deps: all packages present"
else
    echo "install-deps: installing$missing"
    install $missing
    # A package installed from elsewhere (e.g. a backported qemu-utils) can conflict with one
    # just installed from the distribution (qemu-system-common), and apt then removes it:
    # install what went missing together with the rest, so apt picks versions that agree.
    missing_packages
    if [ -n "$missing" ]; then
        echo "install-deps: installing again what apt removed:$missing"
        install $PACKAGES
        missing_packages
        if [ -n "$missing" ]; then
            echo "install-deps: could not install:$missing" >&2
            exit 1
        fi
    fi
    echo "install-deps: done"
fi

# virtiofsd, from crates.io (a few minutes the first time, cached afterwards).
VIRTIOFSD_VERSION=1.14.0
VIRTIOFSD_ROOT="$HOME/.cache/vessel/tools/virtiofsd"
if ! "$VIRTIOFSD_ROOT/bin/virtiofsd" --version 2>/dev/null | grep -q "$VIRTIOFSD_VERSION"; then
    echo "install-deps: building virtiofsd $VIRTIOFSD_VERSION (cargo install)"
    cargo install --quiet --locked --version "$VIRTIOFSD_VERSION" --root "$VIRTIOFSD_ROOT" virtiofsd
fi
