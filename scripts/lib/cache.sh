# shellcheck shell=bash
# The build cache shared by every clone on a machine: our QEMU and the card
# OS image are kept outside the clone, in directories named by a key of their
# inputs, so a fresh clone of the same sources (a CI run, a second worktree)
# finds them built. Sourced, not executed.
#
#   MIC_CACHE_DIR   the cache (default ${XDG_CACHE_HOME:-~/.cache}/mic-emu)
#
# Layout:
#   qemu/<key>/         an installed QEMU (bin/, qemu-version, firmware-path)
#   qemu-work/          QEMU's downloaded and unpacked source and its build tree
#   card/<key>/         a card OS image (vmlinux, vmlinuz, initrd.img, ...)
#   card-work/          downloaded Debian packages, unpacked trees, driver builds
#   vsock/<version>/    vhost-device-vsock from crates.io (bin/; scripts/build-vsock)
#
# An entry is complete when it holds the file `.complete`; entries are built
# beside it under a temporary name and renamed into place, so a reader never
# sees half an entry. `rm -rf "$MIC_CACHE_DIR"` clears everything; the next
# `scripts/setup` rebuilds (and needs the network again).

mic_cache_dir() {
    local home=${HOME:-}
    [ -n "$home" ] || home=$(getent passwd "$(id -u)" | cut -d: -f6)
    printf '%s\n' "${MIC_CACHE_DIR:-${XDG_CACHE_HOME:-$home/.cache}/mic-emu}"
}

# mic_hash_files ROOT PATH... -> one hash of the named files and directories
# under ROOT: their relative names, modes and contents, in a fixed order.
mic_hash_files() {
    local root=$1
    shift
    (cd "$root" && find "$@" \( -type f -o -type l \) ! -name '*.swp' ! -name '*~' -print0 |
        LC_ALL=C sort -z | xargs -0 -r stat -L -c '%n %a' &&
        find "$@" \( -type f -o -type l \) ! -name '*.swp' ! -name '*~' -print0 |
        LC_ALL=C sort -z | xargs -0 -r cat) | sha256sum | cut -c1-16
}

# mic_cache_link LINK TARGET: makes LINK a symlink to TARGET, replacing an
# older link or a directory left by earlier versions of the build scripts.
mic_cache_link() {
    local link=$1 target=$2
    # Every use counts for mic_cache_prune, not only the first.
    touch "$target" 2>/dev/null || true
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$link")"
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        rm -rf "$link"
    fi
    ln -sfn "$target" "$link.tmp.$$"
    mv -Tf "$link.tmp.$$" "$link"
}

# mic_cache_lock DIR: holds an exclusive lock on DIR/.lock on file
# descriptor 9 until the calling shell exits, so clones building at the same
# time take turns on the shared work directories.
mic_cache_lock() {
    mkdir -p "$1"
    exec 9>"$1/.lock"
    if ! flock -n 9; then
        echo "${MIC_CACHE_WHO:-cache}: waiting for another build using $1" >&2
        flock 9
    fi
}

# mic_cache_prune DIR KEEP: removes all but the KEEP most recently used
# complete entries of DIR (an entry counts as used whenever a clone's
# scripts/setup links it, so clones in use keep theirs).
mic_cache_prune() {
    local dir=$1 keep=$2 e
    [ -d "$dir" ] || return 0
    # shellcheck disable=SC2012 # names are hex keys
    ls -1t "$dir" 2>/dev/null | tail -n +"$((keep + 1))" | while read -r e; do
        [ -f "$dir/$e/.complete" ] && rm -rf "${dir:?}/$e"
    done
    return 0
}
