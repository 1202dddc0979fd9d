package disk

// The OS-side health gate, delivered on the config drive under anvil/. A freshly installed
// slot boots with a boot counter (next=<slot>, tries=N). This gate waits until the kubelet
// reports healthy, then marks the running slot good in GRUB's environment block
// (active=<slot>, next=, tries=0). If the kubelet is not healthy within the timeout and the
// running slot is still on trial, it reboots, which spends another attempt; once the
// attempts are gone GRUB returns to the previous slot by itself.
//
// Why not grub-editenv: it truncates the file and writes a new one. A power cut in between
// leaves an empty or short grubenv; GRUB then can neither load nor save the counter
// (save_env never changes a file's size). anvil-mark-good instead rewrites the 1024 bytes in
// place (dd conv=notrunc,fsync) after checking the file is exactly 1024 bytes, keeping every
// other variable as it was. It needs only POSIX sh, awk, dd, head, tr, mount and
// curl or wget.
//
// With ANVIL_REPORT_URL and ANVIL_REPORT_TOKEN set it reports every boot to Anvil: the running
// slot, whether it is marked good, and the slot GRUB gave up on (failed=). The report is how
// Anvil tells a committed upgrade from a rolled-back one; it does not change what boots. TLS
// is not verified for it (the OS has no pin for the boot services' certificate): a forged or
// lost report can only mislead Anvil's status, which times out on its own, never the disk.

// HealthGateScript is /usr/local/sbin/anvil-mark-good.
const HealthGateScript = `#!/bin/sh
# anvil-mark-good: Anvil's A/B health gate. Waits for the kubelet to be healthy, then marks
# the running slot good in GRUB's environment block, in place. Installed by Anvil.
set -u
[ -r /etc/anvil/anvil.env ] && . /etc/anvil/anvil.env
: "${ANVIL_ESP_PARTUUID:?ANVIL_ESP_PARTUUID is not set}"
HEALTHZ_URL=${ANVIL_HEALTHZ_URL:-http://127.0.0.1:10248/healthz}
TIMEOUT=${ANVIL_TIMEOUT_SECONDS:-900}
REBOOT=${ANVIL_REBOOT_ON_FAILURE:-1}
INTERVAL=${ANVIL_INTERVAL_SECONDS:-5}
ENVPATH=${ANVIL_GRUBENV_PATH:-EFI/BOOT/grubenv}
# For tests: another command line, an already mounted ESP, another reboot command.
CMDLINE=${ANVIL_CMDLINE_FILE:-/proc/cmdline}
REBOOT_CMD=${ANVIL_REBOOT_COMMAND:-systemctl reboot}

log() { echo "anvil-mark-good: $*" >&2; }

slot=$(sed -n 's/.*anvil\.slot=\([AB]\).*/\1/p' "$CMDLINE")
if [ -z "$slot" ]; then
	log "not booted by Anvil's GRUB (no anvil.slot= on the kernel command line); nothing to do"
	exit 0
fi

mnt=""
mounted=""
cleanup() { [ -n "$mounted" ] && umount "$mnt" 2>/dev/null; [ -n "${tmp:-}" ] && rm -f "$tmp"; }
trap cleanup EXIT

esp_mount() {
	if [ -n "${ANVIL_ESP_DIR:-}" ]; then
		mnt=$ANVIL_ESP_DIR
	else
		esp_mount_dev || return 1
	fi
	envfile="$mnt/$ENVPATH"
	size=$(wc -c <"$envfile" 2>/dev/null || echo 0)
	if [ "$size" -ne 1024 ]; then
		log "$envfile is $size bytes, not 1024; refusing to touch it"
		return 1
	fi
}

esp_mount_dev() {
	dev=/dev/disk/by-partuuid/$(echo "$ANVIL_ESP_PARTUUID" | tr 'A-Z' 'a-z')
	if [ ! -e "$dev" ]; then
		log "ESP $dev not found"
		return 1
	fi
	mnt=$(findmnt -n -o TARGET -S "$dev" 2>/dev/null | head -n 1)
	if [ -z "$mnt" ]; then
		mnt=/run/anvil/esp
		mkdir -p "$mnt" && mount -t vfat -o rw "$dev" "$mnt" || return 1
		mounted=1
	fi
}

getvar() { sed -n "s/^$1=//p" "$envfile" | head -n 1; }

# report <slot> <good:true|false> <failed slot or empty>
report() {
	[ -n "${ANVIL_REPORT_URL:-}" ] && [ -n "${ANVIL_REPORT_TOKEN:-}" ] || return 0
	case "$3" in A | B) failed_slot=$3 ;; *) failed_slot="" ;; esac
	body="{\"slot\":\"$1\",\"good\":$2,\"failed\":\"$failed_slot\"}"
	if command -v curl >/dev/null 2>&1; then
		curl -fsS -k --max-time 10 --retry 3 -X POST -H "Authorization: Bearer $ANVIL_REPORT_TOKEN" \
			-H "Content-Type: application/json" --data "$body" "$ANVIL_REPORT_URL" >/dev/null 2>&1
	else
		wget -q -T 10 -O /dev/null --no-check-certificate --header="Authorization: Bearer $ANVIL_REPORT_TOKEN" \
			--header="Content-Type: application/json" --post-data="$body" "$ANVIL_REPORT_URL" 2>/dev/null
	fi || log "could not report to Anvil (it stops waiting on its own)"
}

healthy() {
	if command -v curl >/dev/null 2>&1; then
		[ "$(curl -fsS --max-time 5 "$HEALTHZ_URL" 2>/dev/null)" = ok ]
	else
		[ "$(wget -q -T 5 -O - "$HEALTHZ_URL" 2>/dev/null)" = ok ]
	fi
}

esp_mount || exit 1
failed=$(getvar failed)
if [ "$(getvar active)" = "$slot" ] && [ "$(getvar next)" != "$slot" ]; then
	log "slot $slot is already marked good"
	report "$slot" true "$failed"
	exit 0
fi
pending=$(getvar next)
if [ -n "$mounted" ]; then umount "$mnt"; mounted=""; fi

log "slot $slot on trial (next=$pending); waiting up to ${TIMEOUT}s for $HEALTHZ_URL"
start=$(date +%s)
until healthy; do
	if [ $(($(date +%s) - start)) -ge "$TIMEOUT" ]; then
		log "kubelet not healthy within ${TIMEOUT}s; slot $slot stays unconfirmed"
		report "$slot" false "$failed"
		if [ "$pending" = "$slot" ] && [ "$REBOOT" = 1 ]; then
			log "rebooting to spend a boot attempt (GRUB falls back when they are gone)"
			$REBOOT_CMD
		fi
		exit 1
	fi
	sleep "$INTERVAL"
done

esp_mount || exit 1
tmp=$(mktemp /run/anvil-grubenv.XXXXXX)
# Keep every line and its order; set active, and clear next/tries when this slot was the one
# on trial. Lines after the header that start with '#' are padding.
awk -v slot="$slot" '
	NR == 1 { next }
	/^#/ { next }
	{
		k = $0; sub(/=.*/, "", k)
		if (k == "active") { $0 = "active=" slot; seen = 1 }
		if (k == "next" && substr($0, 6) == slot) { $0 = "next="; clear = 1 }
		n++; line[n] = $0; key[n] = k
	}
	END {
		printf "# GRUB Environment Block\n"
		for (i = 1; i <= n; i++) {
			if (key[i] == "tries" && clear) line[i] = "tries=0"
			print line[i]
		}
		if (!seen) print "active=" slot
	}' "$envfile" >"$tmp"
used=$(wc -c <"$tmp")
if [ "$used" -gt 1024 ]; then
	log "new environment block would be $used bytes; not writing"
	exit 1
fi
head -c $((1024 - used)) /dev/zero | tr '\0' '#' >>"$tmp"
dd if="$tmp" of="$envfile" bs=1024 count=1 conv=notrunc,fsync 2>/dev/null || exit 1
sync
log "slot $slot marked good"
report "$slot" true "$failed"
`

// HealthGateUnit is the systemd unit that runs the gate on every boot. Type=simple so the
// unit never holds up multi-user.target (cloud-init's final stage, which runs kubeadm, is
// ordered after it on some distributions).
const HealthGateUnit = `[Unit]
Description=Anvil A/B health gate: mark this slot good once the kubelet is healthy
Wants=network-online.target
After=network-online.target local-fs.target

[Service]
Type=simple
ExecStart=/usr/local/sbin/anvil-mark-good

[Install]
WantedBy=multi-user.target
`

// HealthGateInstallScript copies the gate from the config drive (its first argument is the
// anvil/ directory there) into the OS and starts it without waiting.
const HealthGateInstallScript = `#!/bin/sh
# Installs Anvil's health gate from the config drive. Run once per instance.
set -eu
src=${1:-$(dirname "$0")}
install -D -m 0755 "$src/anvil-mark-good" /usr/local/sbin/anvil-mark-good
install -D -m 0644 "$src/anvil.env" /etc/anvil/anvil.env
install -D -m 0644 "$src/anvil-mark-good.service" /etc/systemd/system/anvil-mark-good.service
systemctl daemon-reload
systemctl enable anvil-mark-good.service
systemctl start --no-block anvil-mark-good.service
`

// userDataHookTemplate is the shell part added to cloud-config user-data: it mounts the
// config drive (by partition GUID, falling back to the cidata label) and runs the installer.
const userDataHookTemplate = `#!/bin/sh
# Anvil: install the A/B health gate from the config drive.
set -eu
dev=/dev/disk/by-partuuid/%s
[ -e "$dev" ] || dev=$(blkid -L cidata)
mnt=$(mktemp -d)
mount -o ro "$dev" "$mnt"
trap 'umount "$mnt"; rmdir "$mnt"' EXIT
sh "$mnt/anvil/install.sh" "$mnt/anvil"
`
