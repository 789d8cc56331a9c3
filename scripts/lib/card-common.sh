# Helpers shared by scripts/build-card-image and the card smoke test.
# Sourced, not executed. Expects `set -euo pipefail` in the caller.

card_log() { printf '[build-card-image] %s\n' "$*" >&2; }
card_die() { printf '[build-card-image] error: %s\n' "$*" >&2; exit 1; }

# apt-get update at most once per run: when forced (a lookup or download
# failed), when there are no package lists, or when our last update is more
# than a day old.
CARD_APT_UPDATED=0
CARD_APT_STAMP=""
card_apt_update() {
	local force="${1:-}"
	if [[ $CARD_APT_UPDATED == 1 ]]; then return 0; fi
	if [[ -z $force ]] && compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null &&
		[[ -n $CARD_APT_STAMP && -f $CARD_APT_STAMP &&
			-z $(find "$CARD_APT_STAMP" -mmin +1440 -print -quit) ]]; then
		return 0
	fi
	card_log "apt-get update"
	apt-get update -qq >&2 || card_die "apt-get update failed"
	CARD_APT_UPDATED=1
	[[ -z $CARD_APT_STAMP ]] || touch "$CARD_APT_STAMP"
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
