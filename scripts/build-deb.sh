#!/bin/sh
# Builds pgfront_<version>_<arch>.deb with dpkg-deb alone (no debhelper, no cargo-deb):
#
#   scripts/build-deb.sh [--binary PATH] [--out DIR]
#
#   --binary PATH  the pgfront executable to package (default: target/release/pgfront,
#                  from `cargo build --release --locked`); it is stripped into the package
#   --out DIR      where the .deb goes (default: target/debian)
#
# Version from Cargo.toml, architecture from `dpkg --print-architecture`, Depends computed from
# the binary's dynamic libraries and glibc symbol versions. Layout:
#   /usr/bin/pgfront, /etc/pgfront/pgfront.toml and /etc/pgfront/agent.toml (conffiles, from
#   config/: the proxy's and the node agent's),
#   /lib/systemd/system/ (the units of systemd/, not enabled), /usr/share/doc/pgfront/
# Maintainer scripts and the control template are in packaging/deb/. Prints the .deb's path.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
binary="$here/target/release/pgfront"
out="$here/target/debian"

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0"
}
die() {
    echo "build-deb.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --binary) [ $# -ge 2 ] || die "--binary needs a path"; binary=$2; shift 2 ;;
    --binary=*) binary=${1#*=}; shift ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

for tool in dpkg-deb dpkg objdump strip gzip md5sum; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install dpkg binutils gzip coreutils)"
done
[ -f "$binary" ] && [ -x "$binary" ] || die "no executable at $binary: run 'cargo build --release --locked' or pass --binary PATH"

version=$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$here/Cargo.toml" | head -n 1)
[ -n "$version" ] || die "no version in $here/Cargo.toml"
arch=$(dpkg --print-architecture)

# A package labelled amd64 must hold an x86-64 binary.
machine=$(objdump -f "$binary" 2>/dev/null | sed -n 's/^architecture: \([^,]*\).*/\1/p')
[ -n "$machine" ] || die "$binary is not an ELF executable"
case "$arch:$machine" in
amd64:i386:x86-64 | arm64:aarch64 | i386:i386 | armhf:arm | ppc64el:powerpc:common64 | s390x:s390:64-bit | riscv64:riscv:rv64) ;;
amd64:* | arm64:*) die "$binary is built for $machine, not for $arch" ;;
*) ;;
esac

# Depends: glibc at the highest symbol version the binary uses, libgcc for unwinding; any other
# library would be a dependency this script does not know how to name.
glibc=$(objdump -T "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -u -V | tail -n 1)
[ -n "$glibc" ] || die "$binary uses no versioned glibc symbol: not a dynamically linked glibc binary?"
depends="libc6 (>= $glibc)"
for lib in $(objdump -p "$binary" | awk '$1 == "NEEDED" { print $2 }'); do
    case "$lib" in
    libc.so.6 | libm.so.6 | libpthread.so.0 | libdl.so.2 | librt.so.1 | libutil.so.1 | ld-linux*.so.*) ;;
    libgcc_s.so.1) depends="$depends, libgcc-s1" ;;
    *) die "$binary needs $lib: add its package to Depends in scripts/build-deb.sh" ;;
    esac
done

maintainer=${PGFRONT_DEB_MAINTAINER:-pgfront maintainers <root@localhost>}

umask 022
stage=$(mktemp -d "${TMPDIR:-/tmp}/pgfront-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT INT TERM
pkg="$stage/pgfront"
doc="$pkg/usr/share/doc/pgfront"
install -d "$pkg/usr/bin" "$pkg/etc/pgfront" "$pkg/lib/systemd/system" "$doc"

strip --strip-unneeded --remove-section=.comment -o "$pkg/usr/bin/pgfront" "$binary"
chmod 0755 "$pkg/usr/bin/pgfront"
install -m 0644 "$here/config/pgfront.toml" "$pkg/etc/pgfront/pgfront.toml"
install -m 0644 "$here/config/agent.toml" "$pkg/etc/pgfront/agent.toml"
units=0
for unit in "$here"/systemd/*.service "$here"/systemd/*.socket; do
    [ -f "$unit" ] || continue
    install -m 0644 "$unit" "$pkg/lib/systemd/system/"
    units=$((units + 1))
done
[ "$units" -gt 0 ] || die "no systemd unit in $here/systemd"
install -m 0644 "$here/README.md" "$doc/README.md"
for d in "$here"/docs/*.md; do
    [ -f "$d" ] && install -m 0644 "$d" "$doc/"
done
install -m 0644 "$here/packaging/deb/copyright" "$doc/copyright"
date=$(LC_ALL=C date -R ${SOURCE_DATE_EPOCH:+-d "@$SOURCE_DATE_EPOCH"})
printf 'pgfront (%s) unstable; urgency=medium\n\n  * Built from the source tree by scripts/build-deb.sh.\n\n -- %s  %s\n' \
    "$version" "$maintainer" "$date" | gzip -9n >"$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

installed_size=$(du -sk "$pkg" | cut -f 1)
install -d "$pkg/DEBIAN"
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@INSTALLED_SIZE@|$installed_size|" -e "s|@DEPENDS@|$depends|" \
    "$here/packaging/deb/control.in" >"$pkg/DEBIAN/control"
(cd "$pkg" && find etc -type f | sort | sed 's|^|/|') >"$pkg/DEBIAN/conffiles"
# md5sums of everything but the conffiles (dpkg keeps theirs itself), as dh_md5sums writes it.
(cd "$pkg" && find usr lib -type f | sort | xargs md5sum) >"$pkg/DEBIAN/md5sums"
for script in postinst prerm postrm; do
    install -m 0755 "$here/packaging/deb/$script" "$pkg/DEBIAN/$script"
done
chmod 0644 "$pkg/DEBIAN/control" "$pkg/DEBIAN/conffiles" "$pkg/DEBIAN/md5sums"

mkdir -p "$out"
deb="$out/pgfront_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
echo "$deb"
