# Shared by the card's init scripts.

# The kernel command line, read once.
read -r CARD_CMDLINE </proc/cmdline

# cmdline_get VAR KEY DEFAULT: sets VAR to the value of KEY=value on the
# kernel command line, else to DEFAULT (no subshell: processes are dear
# under TCG).
cmdline_get() {
	local w
	for w in $CARD_CMDLINE; do
		case "$w" in
		"$2="*) eval "$1=\${w#*=}"; return 0 ;;
		esac
	done
	eval "$1=\$3"
}

# Markers for tests go to the serial port (the card's log), else the console.
# With mic.boottime=1 on the command line, each marker is followed by
# "mic-card: time <seconds since the kernel started> <marker>", which
# scripts/bench-boot reads.
case " $CARD_CMDLINE " in
*" mic.boottime=1 "*) CARD_BOOTTIME=1 ;;
*) CARD_BOOTTIME= ;;
esac
mark() {
	local out=/dev/console up rest
	if [ -c /dev/ttyS0 ] && { : >/dev/ttyS0; } 2>/dev/null; then out=/dev/ttyS0; fi
	if [ -n "$CARD_BOOTTIME" ]; then
		read -r up rest </proc/uptime
		printf 'mic-card: %s\nmic-card: time %s %s\n' "$*" "$up" "$*" >"$out"
	else
		echo "mic-card: $*" >"$out"
	fi
}
