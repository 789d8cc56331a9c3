# shellcheck shell=bash
# Source-only apt entries for Debian suites that carry the QEMU source
# packages.  Only deb-src lines are added, so no binary packages from these
# suites can be installed by accident.

MIC_APT_SOURCES_FILE=${MIC_APT_SOURCES_FILE:-/etc/apt/sources.list.d/mic-qemu-src.sources}

mic_apt_sources_content() {
    cat <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie trixie-updates trixie-backports sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

mic_sudo() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Writes the sources file if it is missing or differs; runs apt-get update
# when it changed or when apt knows no qemu source package yet.
mic_apt_sources_ensure() {
    local want
    want=$(mic_apt_sources_content)
    if [ ! -f "$MIC_APT_SOURCES_FILE" ] || [ "$(cat "$MIC_APT_SOURCES_FILE")" != "$want" ]; then
        echo "build-qemu: adding deb-src entries in $MIC_APT_SOURCES_FILE" >&2
        printf '%s\n' "$want" | mic_sudo tee "$MIC_APT_SOURCES_FILE" >/dev/null
        mic_sudo apt-get update -qq >&2
    elif ! apt-cache showsrc qemu 2>/dev/null | grep -q '^Version:'; then
        mic_sudo apt-get update -qq >&2
    fi
}

# Installs the named Debian packages that are not installed yet. One
# dpkg-query for all of them: nothing else runs when none is missing.
mic_apt_install_missing() {
    local missing=() p installed
    # dpkg-query fails for a package dpkg has never seen: that only means
    # it is missing.
    installed=" $({ dpkg-query -W -f='${Package}:${Status}\n' "$@" 2>/dev/null || true; } |
        sed -n 's/:install ok installed$//p' | tr '\n' ' ') "
    for p in "$@"; do
        case "$installed" in *" $p "*) ;; *) missing+=("$p") ;; esac
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "${MIC_APT_WHO:-build-qemu}: installing ${missing[*]}" >&2
        if ! mic_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
            mic_sudo apt-get update -qq >&2
            mic_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
        fi
    fi
}

MIC_APT_BACKPORTS_FILE=${MIC_APT_BACKPORTS_FILE:-/etc/apt/sources.list.d/bookworm-backports.sources}

# bookworm-backports, whose newer kernel headers scripts/test compiles the
# card driver against. Its packages are only ever downloaded, never
# installed. The package lists are refreshed only when the entry is added.
mic_apt_backports_ensure() {
    if grep -rqs '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    if [ ! -f "$MIC_APT_BACKPORTS_FILE" ]; then
        echo "${MIC_APT_WHO:-setup}: adding $MIC_APT_BACKPORTS_FILE" >&2
        mic_sudo tee "$MIC_APT_BACKPORTS_FILE" >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    mic_sudo apt-get update -qq >&2 || echo "${MIC_APT_WHO:-setup}: warning: apt-get update failed" >&2
}

# All qemu source versions apt knows, one per line.
mic_qemu_source_versions() {
    apt-cache showsrc qemu 2>/dev/null | awk '/^Package: /{p=$2} /^Version: /{if (p=="qemu") print $2}' | sort -u
}

# Versions of the given upstream series ("10.0" or "11"), newest first.
mic_qemu_versions_in_series() {
    local series=$1 v up
    while read -r v; do
        up=${v#*:}; up=${up%%+*}; up=${up%%-*}
        case "$up" in
            "$series".*) printf '%s\n' "$v" ;;
        esac
    done < <(mic_qemu_source_versions) | mic_sort_versions_desc
}

# Sorts Debian versions (one per line) newest first.
mic_sort_versions_desc() {
    local vs=() v i j t
    while read -r v; do vs+=("$v"); done
    for ((i = 0; i < ${#vs[@]}; i++)); do
        for ((j = i + 1; j < ${#vs[@]}; j++)); do
            if dpkg --compare-versions "${vs[j]}" gt "${vs[i]}"; then
                t=${vs[i]}; vs[i]=${vs[j]}; vs[j]=$t
            fi
        done
    done
    for v in "${vs[@]}"; do printf '%s\n' "$v"; done
}
