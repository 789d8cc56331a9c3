# shellcheck shell=bash
# Debian packages the card OS is made of: which ones (resolved from the apt
# lists, cached per state of the lists), downloading and unpacking them, and
# making unpacked kernel headers usable for out-of-tree builds. Sourced by
# scripts/build-card-image and scripts/test; expects `set -euo pipefail`.
#
# Nothing here touches the network unless a package is missing: the package
# lists are refreshed only when they are absent or a lookup or download
# fails, never on a schedule.

card_log() { printf '[build-card-image] %s\n' "$*" >&2; }
card_die() { printf '[build-card-image] error: %s\n' "$*" >&2; exit 1; }

# apt-get update at most once per run, and only when asked to (a lookup or
# download failed) or when there are no package lists at all.
CARD_APT_UPDATED=0
card_apt_update() {
	local force="${1:-}"
	if [[ $CARD_APT_UPDATED == 1 ]]; then return 0; fi
	if [[ -z $force ]] && compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
		return 0
	fi
	card_log "apt-get update"
	mic_sudo apt-get update -qq >&2 || card_die "apt-get update failed"
	CARD_APT_UPDATED=1
}

# A key of the current package lists: resolutions are cached under it.
card_lists_key() {
	stat -c '%n %Y %s' /var/lib/apt/lists/*_Packages* 2>/dev/null | sha256sum | cut -c1-16
}

# card_resolve_dep PKG[=VERSION] PREFIX -> name of the first dependency of PKG
# that starts with PREFIX (e.g. the linux-image-X-amd64 behind linux-image-amd64).
card_resolve_dep() {
	local pkg="$1" prefix="$2" dep
	dep=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null |
		awk '!f && /^Depends: / {sub(/^Depends: /, ""); print; f=1}' | tr ',' '\n' |
		sed 's/^ *//; s/ .*//' | awk -v p="$prefix" '!f && index($0, p) == 1 {print; f=1}') || true
	printf '%s' "$dep"
}

# card_pkg_version PKG -> candidate version
card_pkg_version() {
	apt-cache policy "$1" 2>/dev/null | awk '!f && $1 == "Candidate:" {print $2; f=1}' 
}

# card_fetch DESTDIR PKG[=VERSION]... -> downloads missing .debs into DESTDIR,
# prints the .deb paths (one per line, in argument order).
card_fetch() {
	local dest="$1"; shift
	local spec name ver file
	mkdir -p "$dest"
	for spec in "$@"; do
		name="${spec%%=*}"
		if [[ $spec == *=* ]]; then ver="${spec#*=}"; else ver=$(card_pkg_version "$name"); fi
		[[ -n $ver && $ver != "(none)" ]] || card_die "package $name not found in the apt lists"
		# apt-get download names files NAME_VERSION_ARCH.deb with ':' as %3a
		file=$(compgen -G "$dest/${name}_${ver//:/%3a}_*.deb" | head -n1 || true)
		if [[ -z $file ]]; then
			card_log "downloading $name=$ver"
			(cd "$dest" && apt-get download -qq "$name=$ver" >&2 2>/dev/null) ||
				(cd "$dest" && apt-get download "$name=$ver" >&2) ||
				card_die "apt-get download $name=$ver failed (stale package lists? rerun after apt-get update)"
			file=$(compgen -G "$dest/${name}_${ver//:/%3a}_*.deb" | head -n1 || true)
			[[ -n $file ]] || card_die "downloaded $name but cannot find its .deb"
		fi
		printf '%s\n' "$file"
	done
}

# card_unpack DEB DESTDIR -> dpkg-deb -x, skipped if DESTDIR already holds
# this exact .deb (stamp file).
card_unpack() {
	local deb="$1" dest="$2" stamp
	stamp="$dest/.unpacked-$(basename "$deb")"
	if [[ -e $stamp ]]; then return 0; fi
	mkdir -p "$dest"
	dpkg-deb -x "$deb" "$dest"
	touch "$stamp"
}

# card_modinfo_field KO FIELD -> value of a .modinfo field of a module file
card_modinfo_field() {
	objcopy -O binary --only-section=.modinfo "$1" /dev/stdout 2>/dev/null |
		tr '\0' '\n' | sed -n "s/^$2=//p" | head -n1
}

# card_fix_headers ROOT KVER -> make the unpacked headers usable in place:
# the arch Makefile includes /usr/src/linux-headers-*-common/Makefile by an
# absolute path; point it at the unpacked copy. The scripts/ and tools/
# links are relative and resolve inside ROOT already.
card_fix_headers() {
	local root="$1" kver="$2" mk common want
	mk="$root/usr/src/linux-headers-$kver/Makefile"
	[[ -f $mk ]] || card_die "missing $mk"
	common=$(sed -n 's|^include /usr/src/\(linux-headers-[^/]*\)/Makefile$|\1|p' "$mk")
	if [[ -z $common ]]; then
		common=$(sed -n "s|^include $root/usr/src/\\(linux-headers-[^/]*\\)/Makefile\$|\\1|p" "$mk")
	fi
	if [[ -z $common ]]; then
		common=$(sed -n 's|^include .*/\(linux-headers-[^/]*\)/Makefile$|\1|p' "$mk")
	fi
	[[ -n $common && -d $root/usr/src/$common ]] || card_die "cannot find the common headers for $kver"
	want="include $root/usr/src/$common/Makefile"
	if [[ $(cat "$mk") != "$want" ]]; then
		printf '%s\n' "$want" >"$mk"
	fi
	# scripts/ and tools/ must resolve inside ROOT
	[[ -e $root/usr/src/linux-headers-$kver/scripts/Makefile.build ]] ||
		card_die "headers for $kver: scripts/ does not resolve (linux-kbuild missing?)"
}

# card_resolve_kernel -> sets KIMG, KVER, KPKGVER, KHDR, KCOMMON, KKBUILD: the
# kernel behind linux-image-amd64 and the packages its headers need.
card_resolve_kernel() {
	KIMG=$(card_resolve_dep linux-image-amd64 linux-image-)
	if [[ -z $KIMG ]]; then
		card_apt_update force
		KIMG=$(card_resolve_dep linux-image-amd64 linux-image-)
	fi
	[[ -n $KIMG ]] || card_die "cannot resolve linux-image-amd64"
	KVER=${KIMG#linux-image-}
	KPKGVER=$(card_pkg_version "$KIMG")
	KHDR=linux-headers-$KVER
	KCOMMON=$(card_resolve_dep "$KHDR=$KPKGVER" linux-headers-)
	KKBUILD=$(card_resolve_dep "$KHDR=$KPKGVER" linux-kbuild-)
	[[ -n $KCOMMON && -n $KKBUILD ]] || card_die "cannot resolve the dependencies of $KHDR"
}

# card_resolve_packages EXTRA... -> name=version of every package the image
# is made of, one per line, in a fixed order: kernel image, headers, common
# headers, kbuild, busybox-static, then the extra packages named.
card_resolve_packages() {
	local p
	card_resolve_kernel
	printf '%s\n' "$KIMG=$KPKGVER" "$KHDR=$KPKGVER" \
		"$KCOMMON=$(card_pkg_version "$KCOMMON")" "$KKBUILD=$(card_pkg_version "$KKBUILD")"
	for p in busybox-static "$@"; do
		printf '%s\n' "$p=$(card_pkg_version "$p")"
	done
}

# card_resolved WORKDIR EXTRA... -> the output of card_resolve_packages,
# cached in WORKDIR per state of the package lists (the lookups take seconds;
# reading the cache needs no apt at all).
card_resolved() {
	local work=$1 cache s
	shift
	card_apt_update
	cache="$work/resolved-$(card_lists_key)-$(printf '%s ' "$@" | sha256sum | cut -c1-8).txt"
	if [[ ! -s $cache ]]; then
		mkdir -p "$work"
		card_resolve_packages "$@" >"$cache.tmp.$$"
		while read -r s; do
			[[ $s == *=?* && $s != *"=(none)" ]] || { rm -f "$cache.tmp.$$"; card_die "cannot resolve ${s%%=*}"; }
		done <"$cache.tmp.$$"
		mv -f "$cache.tmp.$$" "$cache"
	fi
	cat "$cache"
}

# card_build_driver HEADERS_ROOT KVER BUILDDIR -> builds the driver with its
# own Makefile against unpacked headers; prints the module's path.
card_build_driver() {
	local root=$1 kver=$2 bdir=$3 log
	card_fix_headers "$root" "$kver"
	mkdir -p "$bdir"
	log=$bdir.log
	if ! make -C "$CARD_REPO/guest-images/driver" KDIR="$root/usr/src/linux-headers-$kver" \
		BUILD="$bdir" >"$log" 2>&1; then
		cat "$log" >&2
		card_die "driver build against $kver failed"
	fi
	if grep -E 'warning:|error:' "$log" | grep -v 'Skipping BTF' >&2; then
		card_log "driver build against $kver produced warnings (see above)"
	fi
	printf '%s\n' "$bdir/mic_x100_vop.ko"
}

# card_check_driver_backports WORKDIR -> compiles the driver against
# bookworm-backports' newest kernel headers (6.12 as of writing); the apt
# source is set up by scripts/setup (mic_apt_backports_ensure).
card_check_driver_backports() {
	local work=$1 meta hdr ver common kbuild kver root ko d
	local debs=()
	meta=$(apt-cache madison linux-headers-amd64 2>/dev/null |
		awk -F'|' '!f && $3 ~ /bookworm-backports\/main amd64 Packages/ {gsub(/ /,"",$2); print $2; f=1}')
	[[ -n $meta ]] || card_die "bookworm-backports has no linux-headers-amd64 (run scripts/setup)"
	hdr=$(card_resolve_dep "linux-headers-amd64=$meta" linux-headers-)
	[[ -n $hdr ]] || card_die "cannot resolve linux-headers-amd64=$meta"
	kver=${hdr#linux-headers-}
	ver=$(apt-cache madison "$hdr" | awk -F'|' '!f && / Packages$/ {gsub(/ /,"",$2); print $2; f=1}')
	common=$(card_resolve_dep "$hdr=$ver" linux-headers-)
	kbuild=$(card_resolve_dep "$hdr=$ver" linux-kbuild-)
	[[ -n $common && -n $kbuild ]] || card_die "cannot resolve the dependencies of $hdr"
	case "$kver" in 6.12*) ;; *) card_log "note: backports headers are $kver, not 6.12" ;; esac
	mapfile -t debs < <(card_fetch "$work/debs" "$hdr=$ver" "$common=$ver" "$kbuild=$ver")
	root="$work/pkgs/headers-$kver"
	for d in "${debs[@]}"; do card_unpack "$d" "$root"; done
	ko=$(card_build_driver "$root" "$kver" "$work/driver-$kver")
	card_log "driver compiles against $kver ($(card_modinfo_field "$ko" vermagic))"
}
