#!/bin/sh
# /init of the Linux guest of `cargo qemu-linux` (written into the initramfs by
# virtio-iommu-runner, runner/src/linux/). Runs under busybox ash as PID 1 on /dev/console.
# Prints TAP lines, `disk-sha256: <hex>`, the kernel's IOMMU log as `# ` comments,
# `linux: N passed, M failed`, then powers the machine off. The runner checks the output.

/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

n=0
failed=0
# result <status> <description> [diagnostic]: one TAP line; status 0 is `ok`.
result() {
	n=$((n + 1))
	if [ "$1" = 0 ]; then
		echo "ok $n - $2"
	else
		failed=$((failed + 1))
		diagnostic=$(printf '%s' "$3" | tr '\n' ' ')
		echo "not ok $n - $2${diagnostic:+ # $diagnostic}"
	fi
}
# finish: the plan, the summary, power-off (never returns).
finish() {
	echo "1..$n"
	echo "linux: $((n - failed)) passed, $failed failed"
	sync
	poweroff -f
	sleep 10
}
# flush: write back and drop every cached page, so that the next read goes to the disk.
flush() {
	sync
	blockdev --flushbufs /dev/vda 2>/dev/null
	echo 3 >/proc/sys/vm/drop_caches
}

echo "linux: kernel $(uname -r)"
echo "linux: cmdline $(cat /proc/cmdline)"

# The modules, in load order (dependencies first): /lib/modules/NN-<name>.ko.
for module in /lib/modules/*.ko; do
	[ -e "$module" ] || break
	name=${module##*/}
	name=${name#*-}
	name=${name%.ko}
	out=$(insmod "$module" 2>&1)
	result $? "insmod $name" "$out"
done

# The IOMMU probed: virtio-iommu registered an IOMMU device.
iommus=$(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')
[ -n "$iommus" ]
result $? "virtio-iommu probed (/sys/class/iommu: ${iommus:-none})"

# The disk appears once virtio_blk probed its device (bounded wait).
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do
	usleep 100000
	tries=$((tries + 1))
done
[ -b /dev/vda ]
result $? "virtio-blk disk /dev/vda present"
if [ ! -b /dev/vda ]; then
	finish
fi

# The disk's PCI function (the parent of its virtio device) is in an IOMMU group.
virtio=$(readlink -f /sys/block/vda/device)
pci=${virtio%/*}
function=${pci##*/}
group=$(readlink "$pci/iommu_group" 2>/dev/null)
group=${group##*/}
type=$(cat "/sys/kernel/iommu_groups/$group/type" 2>/dev/null)
[ -n "$group" ] && [ -n "$type" ]
result $? "disk's PCI function $function in IOMMU group ${group:-none} (type ${type:-none})"
echo "iommu-group-type: ${type:-none}"

# The whole disk, read once through the IOMMU.
sectors=$(cat /sys/block/vda/size)
flush
sum=$(sha256sum /dev/vda)
status=$?
sum=${sum%% *}
[ $status = 0 ] && [ ${#sum} = 64 ]
result $? "read the whole disk ($((sectors * 512)) bytes)"
echo "disk-sha256: $sum"

# A scratch region (the last 64 KiB): write a random pattern, read it back from the disk,
# restore the original and read that back too.
scratch=$((sectors - 128))
dd if=/dev/vda of=/tmp/original bs=512 skip=$scratch count=128 2>/dev/null
dd if=/dev/urandom of=/tmp/pattern bs=512 count=128 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=512 seek=$scratch count=128 conv=notrunc,fsync 2>/dev/null
flush
dd if=/dev/vda of=/tmp/back bs=512 skip=$scratch count=128 2>/dev/null
cmp -s /tmp/pattern /tmp/back && ! cmp -s /tmp/original /tmp/back
result $? "scratch region (64 KiB at sector $scratch) written and read back"
dd if=/tmp/original of=/dev/vda bs=512 seek=$scratch count=128 conv=notrunc,fsync 2>/dev/null
flush
dd if=/dev/vda of=/tmp/back bs=512 skip=$scratch count=128 2>/dev/null
cmp -s /tmp/original /tmp/back
result $? "scratch region restored"
again=$(sha256sum /dev/vda)
again=${again%% *}
[ "$again" = "$sum" ]
result $? "whole disk unchanged after the restore"

# What the kernel logged about the IOMMU; no fault reported by virtio-iommu.
echo "# kernel log about the IOMMU (dmesg | grep -i iommu):"
dmesg | grep -i iommu | sed 's/^/#   /'
faults=$(dmesg | grep -i 'virtio_iommu' | grep -ci 'fault')
[ "$faults" = 0 ]
result $? "no fault logged by virtio-iommu" "$faults fault line(s)"

finish
