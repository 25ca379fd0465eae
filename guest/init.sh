#!/bin/busybox sh
# Vessel guest /init: PID 1 of the initramfs that vessel-image builds for
# both images (debian, minimal). It is embedded into the crate with
# include_str!, so editing it changes the initramfs (and rebuilds it).
#
# Contract with the host side:
# - prints exactly the line VESSEL-GUEST-READY on the console once the
#   kernel modules are loaded and /proc, /sys, /dev are mounted;
# - mounts the first virtio disk that is ext4 on /mnt and, if it holds a
#   file vessel-run, runs it with `sh /mnt/vessel-run` (output on the
#   console), then prints "vessel-init: vessel-run exit status N";
# - with the word vessel.poweroff on the kernel command line it powers off
#   afterwards; otherwise it starts a shell on the console and powers off
#   when that shell exits.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /mnt /tmp /root
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export HOME=/root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# The kernel does not auto-mount devtmpfs for an initramfs; accept a /dev that
# is already devtmpfs, keep the archive's /dev/console and /dev/null otherwise.
if ! grep -q '^[^ ]* /dev devtmpfs ' /proc/mounts; then
    mount -t devtmpfs devtmpfs /dev || echo "vessel-init: cannot mount devtmpfs on /dev"
fi
mount -t tmpfs tmpfs /tmp || echo "vessel-init: cannot mount tmpfs on /tmp"
exec </dev/console >/dev/console 2>&1

# Kernel modules, dependencies first (the list is empty for minimal).
if [ -f /etc/vessel-modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        if ! err=$(insmod "/lib/modules/$mod" 2>&1); then
            echo "vessel-init: insmod $mod failed: $err"
        fi
    done </etc/vessel-modules
fi

echo VESSEL-GUEST-READY >/dev/console

# Number of virtio block devices the kernel found (virtio device id 2).
virtio_disks() {
    local count=0 f
    for f in /sys/bus/virtio/devices/*/device; do
        [ "$(cat "$f" 2>/dev/null)" = 0x0002 ] && count=$((count + 1))
    done
    echo "$count"
}

# Mounts the first /dev/vdX that is ext4 on /mnt and prints its name.
mount_first_ext4() {
    local d
    for d in /dev/vda /dev/vdb /dev/vdc /dev/vdd /dev/vde /dev/vdf /dev/vdg /dev/vdh; do
        [ -b "$d" ] || continue
        if mount -t ext4 "$d" /mnt 2>/dev/null; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

# Give disk nodes up to 2 s to appear, but do not wait when every virtio
# disk the kernel announced already has its node (or there is none).
disk=""
tries=0
while :; do
    disk=$(mount_first_ext4) && break
    disk=""
    nodes=$(ls /dev/vd? 2>/dev/null | wc -l)
    [ "$nodes" -ge "$(virtio_disks)" ] && break
    [ "$tries" -ge 20 ] && break
    tries=$((tries + 1))
    usleep 100000
done

if [ -n "$disk" ]; then
    echo "vessel-init: mounted $disk on /mnt"
    if [ -f /mnt/vessel-run ]; then
        sh /mnt/vessel-run
        echo "vessel-init: vessel-run exit status $?"
    fi
    sync
    umount /mnt || echo "vessel-init: cannot unmount /mnt"
fi

for word in $(cat /proc/cmdline); do
    if [ "$word" = vessel.poweroff ]; then
        sync
        poweroff -f
    fi
done

echo "vessel-init: shell on the console; exit it to power off"
setsid cttyhack sh
sync
poweroff -f
