#!/bin/bash
# Builds the demo flavours' guests from Debian's packages: one kernel shared by
# all and one initramfs per flavour (busybox-static, the virtio disk, console and
# network modules, ext4's (to read its root once installed),
# demo/guest-init and the flavour's identity). Cached: a second run with the same
# packages does nothing.
#   build-guests.sh OUTDIR [NAME:TITLE:KIND ...]
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:?usage: build-guests.sh OUTDIR [NAME:TITLE:KIND ...]}
shift
[ $# -gt 0 ] || set -- "ubuntu:Ubuntu:desktop" "kubuntu:Kubuntu:desktop" "xubuntu:Xubuntu:desktop" "server:Ubuntu Server:server"
mkdir -p "$OUT/debs"
OUT=$(cd "$OUT" && pwd)

# The kernel ABI that Debian's linux-image-amd64 points at today.
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1
}
KPKG=$(kernel_package)
if [ -z "$KPKG" ] && ! ls "$OUT"/debs/linux-image-*-amd64_*.deb >/dev/null 2>&1; then
  apt-get update -q >&2 && KPKG=$(kernel_package)   # a machine whose package lists were never fetched
fi
if [ -z "$KPKG" ]; then
  KPKG=$(ls "$OUT"/debs/linux-image-*-amd64_*.deb 2>/dev/null | head -n1 | xargs -r basename | cut -d_ -f1)
fi
[ -n "$KPKG" ] || { echo "build-guests: cannot find Debian's kernel package (apt-get update?)" >&2; exit 1; }
KVER=${KPKG#linux-image-}
(cd "$OUT/debs"
 ls "${KPKG}"_*.deb >/dev/null 2>&1 || apt-get download "$KPKG"
 ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download busybox-static)

key=$(cd "$OUT/debs" && ls "${KPKG}"_*.deb busybox-static_*.deb; cat "$HERE/guest-init" "$HERE/build-guests.sh"; echo "$@")
key=$(echo "$key" | sha256sum | cut -c1-16)
if [ -f "$OUT/.built-$key" ]; then
  exit 0
fi

X=$(mktemp -d "$OUT/extract.XXXXXX")
trap 'rm -rf "$X"' EXIT
dpkg-deb -x "$OUT"/debs/"${KPKG}"_*.deb "$X/k"
dpkg-deb -x "$OUT"/debs/busybox-static_*.deb "$X/bb"
# written beside and renamed: the cache may be a hard-linked copy, whose files must not change in place
cp "$X/k/boot/vmlinuz-$KVER" "$OUT/vmlinuz.new" && mv -f "$OUT/vmlinuz.new" "$OUT/vmlinuz"
for spec in "$@"; do
  IFS=: read -r name title kind <<<"$spec"
  R="$X/root-$name"
  mkdir -p "$R"/{bin,dev,proc,sys,run,etc,lib/modules}
  cp "$X/bb/bin/busybox" "$R/bin/busybox"
  for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console \
           crc16 mbcache jbd2 crc32c_generic ext4 failover net_failover virtio_net; do
    f=$(find "$X/k/lib/modules/$KVER" -name "$m.ko*" | head -n1)
    [ -n "$f" ] && cp "$f" "$R/lib/modules/$m.ko"
  done
  install -m 755 "$HERE/guest-init" "$R/init"
  printf 'FLAVOUR=%s\nTITLE="%s"\nKIND=%s\n' "$name" "$title" "$kind" > "$R/etc/flavour"
  # uncompressed: under TCG, unpacking a compressed archive costs boot time; reproducible
  # (fixed times and owners, sorted, no inode numbers): the same inputs give the same bytes in
  # every checkout, so what is cached by those bytes (mastered media, Xen statefiles) is found
  find "$R" -exec touch -h -d @0 {} +
  (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) > "$OUT/initrd-$name.cpio.new"
  mv -f "$OUT/initrd-$name.cpio.new" "$OUT/initrd-$name.cpio"
done
rm -f "$OUT"/.built-*
touch "$OUT/.built-$key"

