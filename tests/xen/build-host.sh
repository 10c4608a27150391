#!/bin/bash
# Build the Xen test host from Debian 12's packages: Xen 4.17, a dom0 kernel
# and a dom0 initramfs that runs the xl toolstack, Xen's device model (QEMU, for PV
# framebuffers) and Python 3 with the Debian packages xsession needs, plus the
# tiny test guest (kernel + busybox initramfs).
#
# Nothing is installed on this machine: the packages are fetched with
# `apt-get download` and unpacked. The result is cached machine-wide in
# /var/cache/xenubuntu/xen-host/host-KEY/ (every checkout shares it), KEY being a
# hash of the package versions and of the files that go into the images, so a
# second run costs nothing; an entry whose archives do not unpack is built again.
# Prints the folder of the images on its last line:
#   xen              the hypervisor, gunzipped (QEMU's multiboot loader needs the ELF)
#   vmlinuz          Debian's kernel, for dom0 and for the guests
#   dom0.cpio.gz     dom0's initramfs (its /init is tests/xen/dom0-init)
#   guest.cpio.gz    the test guest's initramfs (its /init is tests/xen/guest-init)
# The C libraries are taken from this (Debian 12) machine through ldd.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${XEN_CACHE:-/var/cache/xenubuntu/xen-host}
mkdir -p "$CACHE/debs"
# one builder at a time (other checkouts share the cache)
exec 9>"$CACHE/.lock"
flock 9

candidate() { apt-cache policy "$1" 2>/dev/null | sed -n 's/^ *Candidate: //p'; }
if [ -z "$(candidate xen-hypervisor-4.17-amd64)" ] || [ "$(candidate xen-hypervisor-4.17-amd64)" = "(none)" ]; then
  apt-get update -q >&2
fi
# the newest 6.1 kernel ABI the archive carries (older ones leave the mirror)
KVER=${KVER:-$(apt-cache search '^linux-image-6\.1\.0-[0-9]+-amd64$' | cut -d' ' -f1 | sort -V | tail -n 1 | sed 's/^linux-image-//')}
[ -n "$KVER" ] || { echo "build-host: no linux-image-6.1.0-N-amd64 in the apt lists" >&2; exit 1; }

PKGS=(
  xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxencall1 libxendevicemodel1 libxenevtchn1 libxenforeignmemory1 libxengnttab1
  libxenhypfs1 libxenmisc4.17 libxenstore4 libxentoolcore1 libxentoollog1 libyajl2
  qemu-system-xen qemu-system-data
  "linux-image-$KVER" busybox-static zstd libzstd1
  python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3-yaml libyaml-0-2
)
versions=$(for p in "${PKGS[@]}"; do echo "$p=$(candidate "$p")"; done)
# dom0's internal network runs this machine's ip, nft and dnsmasq (as xsessiond does on a host)
NET_TOOLS="/usr/bin/ip /usr/sbin/nft /usr/sbin/dnsmasq"
net_versions=$(dpkg-query -W iproute2 nftables dnsmasq-base)
KEY=$( { echo "$versions"; echo "$net_versions"; cat "$HERE/build-host.sh" "$HERE/dom0-init" "$HERE/guest-init"; } |
       sha256sum | cut -c1-16)
OUT=$CACHE/host-$KEY
if gzip -t "$OUT/dom0.cpio.gz" 2>/dev/null && gzip -t "$OUT/guest.cpio.gz" 2>/dev/null; then echo "$OUT"; exit 0; fi

download() { ( cd "$CACHE/debs" && apt-get download "${PKGS[@]}" >&2 2> >(grep -v 'unsandboxed' >&2) ); }
# stale apt lists name versions the mirror no longer has: refresh once and try again
if ! download; then
  [ -z "${XEN_APT_UPDATED:-}" ] || { echo "build-host: apt-get download failed" >&2; exit 1; }
  apt-get update -q >&2
  XEN_APT_UPDATED=1 exec "$0" "$@"
fi
TMP=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
X=$TMP/extract R=$TMP/dom0 G=$TMP/guest B=$TMP/out
mkdir -p "$X" "$B"
for p in "${PKGS[@]}"; do
  v=$(candidate "$p"); v=${v/:/%3a}     # the epoch is written %3a in file names
  f=$(ls "$CACHE/debs/${p}_${v}"_*.deb 2>/dev/null | head -n 1)
  [ -n "$f" ] || { echo "build-host: $p $v was not downloaded" >&2; exit 1; }
  case $p in
    linux-image-*) dpkg-deb --fsys-tarfile "$f" |
                   tar -x -C "$X" "./boot/vmlinuz-$KVER" "./lib/modules/$KVER/kernel/drivers/xen" \
                     "./lib/modules/$KVER/kernel/drivers/net/xen-netback" \
                     "./lib/modules/$KVER/kernel/drivers/net/xen-netfront.ko" \
                     "./lib/modules/$KVER/kernel/net/bridge/bridge.ko" "./lib/modules/$KVER/kernel/net/802/stp.ko" \
                     "./lib/modules/$KVER/kernel/net/llc/llc.ko" \
                     "./lib/modules/$KVER/kernel/net/netfilter/nfnetlink.ko" \
                     "./lib/modules/$KVER/kernel/net/netfilter/nf_tables.ko" \
                     "./lib/modules/$KVER/kernel/lib/libcrc32c.ko" \
                     "./lib/modules/$KVER/kernel/crypto/crc32c_generic.ko" ;;
    *)             dpkg-deb -x "$f" "$X" ;;
  esac
done
BB=$X/bin/busybox
zcat "$X/boot/xen-4.17-amd64.gz" > "$B/xen"
cp "$X/boot/vmlinuz-$KVER" "$B/vmlinuz"
mkcpio() { (cd "$1" && find . | "$BB" cpio -o -H newc 2>/dev/null | gzip -1) > "$2"; }

# --- the guest: busybox and an /init that prints a ready line and a counter
mkdir -p "$G"/{bin,dev,proc,sys,lib/modules}
cp "$BB" "$G/bin/busybox"
for a in sh cat cut sleep mount echo stty ip udhcpc insmod seq chmod printf; do ln -s busybox "$G/bin/$a"; done
# its NIC, when the domain has a vif
cp "$X/lib/modules/$KVER/kernel/drivers/net/xen-netfront.ko" "$G/lib/modules/"
install -m 755 "$HERE/guest-init" "$G/init"
mkcpio "$G" "$B/guest.cpio.gz"

# --- dom0
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib64,dev,proc,sys,tmp,run/xen,run/xenstored,etc/xen}
mkdir -p "$R"/var/{lib/xen,lib/xenstored,log/xen/console,lock}
ln -s ../run "$R/var/run"
cp "$BB" "$R/bin/busybox"
for a in $("$BB" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
# Xen userland in Debian's layout: libxl runs helpers from /usr/lib/xen-4.17/bin
mkdir -p "$R/usr/lib/xen-4.17" "$R/usr/lib/x86_64-linux-gnu"
cp -a "$X/usr/lib/xen-4.17/bin" "$X/usr/lib/xen-4.17/boot" "$R/usr/lib/xen-4.17/"
cp -a "$X"/usr/lib/x86_64-linux-gnu/{libxen,libxl,libyajl,libyaml,libzstd}* "$R/usr/lib/x86_64-linux-gnu/"
cp -a "$X"/usr/bin/xenstore* "$X/usr/bin/zstd" "$R/usr/bin/"
# Xen's device model (QEMU), where libxl looks for it: it serves the PV framebuffer over VNC
mkdir -p "$R/usr/libexec"
cp -a "$X/usr/libexec/xen-qemu-system-i386" "$R/usr/libexec/"
mkdir -p "$R/usr/share/qemu" && cp -a "$X/usr/share/qemu/keymaps" "$R/usr/share/qemu/"  # its VNC server reads one
cp -a "$X/etc/xen/." "$R/etc/xen/"
# Python from Debian's packages, in Debian's layout (site.py adds dist-packages)
cp -a "$X/usr/bin/python3.11" "$R/usr/bin/"
ln -s python3.11 "$R/usr/bin/python3"
mkdir -p "$R/usr/lib/python3/dist-packages"
cp -a "$X/usr/lib/python3.11" "$R/usr/lib/"
cp -a "$X/usr/lib/python3/dist-packages/." "$R/usr/lib/python3/dist-packages/"
rm -rf "$R/usr/lib/python3.11/test" "$R"/usr/lib/python3.11/lib-dynload/_test*
for t in $NET_TOOLS; do cp -L "$t" "$R/usr/bin/"; done
# dnsmasq gives up root for "nobody"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$R/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$R/etc/group"
# the shared libraries of all that (libc, libz, libexpat, libssl, ...) from this machine
{ for b in "$R"/usr/lib/xen-4.17/bin/* "$R"/usr/bin/* "$R"/usr/libexec/* "$R"/usr/lib/python3.11/lib-dynload/*.so \
           "$R"/usr/lib/python3/dist-packages/*.so "$R"/usr/lib/python3/dist-packages/*/*.so; do
    [ -f "$b" ] || continue
    LD_LIBRARY_PATH=$X/usr/lib/x86_64-linux-gnu ldd "$b" 2>/dev/null || true
  done; } | sed -n 's/.*=> \(\/.*\) (0x[0-9a-f]*)$/\1/p; s/^\t\(\/[^ ]*\) (0x[0-9a-f]*)$/\1/p' |
sort -u | while read -r lib; do
  case "$lib" in "$X"/*) continue ;; esac
  [ -e "$R$lib" ] || { mkdir -p "$R$(dirname "$lib")" && cp -L "$lib" "$R$lib"; }
done
# glibc dlopen()s libgcc_s for pthread_cancel; ldd does not list it, and xl
# aborts with "libgcc_s.so.1 must be installed for pthread_cancel to work"
cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 "$R/lib/x86_64-linux-gnu/"
# Debian's kernel builds the Xen drivers dom0 needs as modules
for m in xen-privcmd xenfs/xenfs xen-evtchn xen-gntdev xen-gntalloc; do
  cp "$X/lib/modules/$KVER/kernel/drivers/xen/$m.ko" "$R/lib/modules/"
done
# and those of dom0's internal network: the bridge, Xen's network backend, nftables
for m in drivers/net/xen-netback/xen-netback net/llc/llc net/802/stp net/bridge/bridge net/netfilter/nfnetlink \
         crypto/crc32c_generic lib/libcrc32c net/netfilter/nf_tables; do
  cp "$X/lib/modules/$KVER/kernel/$m.ko" "$R/lib/modules/"
done
# dom0 keeps its fixed size: xl must not balloon it down on its own
echo 'autoballoon = "off"' > "$R/etc/xen/xl.conf"
install -m 755 "$HERE/dom0-init" "$R/init"
echo "$versions" > "$R/etc/xen-test-host-versions"
mkcpio "$R" "$B/dom0.cpio.gz"
echo "$versions" > "$B/versions"
rm -rf "$OUT" && mv "$B" "$OUT"
echo "$OUT"
