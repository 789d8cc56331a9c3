# Shared by the card's init scripts.

# Markers for tests go to the serial port (the card's log), else the console.
mark() {
	if [ -c /dev/ttyS0 ] && { : >/dev/ttyS0; } 2>/dev/null; then
		echo "mic-card: $*" >/dev/ttyS0
	else
		echo "mic-card: $*" >/dev/console
	fi
}

# cmdline_get KEY DEFAULT -> value of KEY=value on the kernel command line
cmdline_get() {
	local w
	for w in $(cat /proc/cmdline); do
		case "$w" in
		"$1="*) echo "${w#*=}"; return 0 ;;
		esac
	done
	echo "$2"
}
