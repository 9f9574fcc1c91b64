#!/usr/bin/env bash
# The device side on (emulated) 64-bit ARM: a Debian bookworm arm64 root under qemu-user, the device
# wheel installed there with examples/raspberry_pi/install.sh and aarch64 wheels from the package
# index, then `ecos-device score`, `predict` and an agent round against the local broker, compared
# with the same commands on x86. Writes docs/results/pi.md. Not part of the test suite (it takes long:
# ~20 min the first time: ~10 to build the root, ~8 for the rest; ~8 again with the cached root). Needs root.
#
#   sudo scripts/check-arm64.sh            # ECOS_ARM64_ROOT (default runs/arm64-root) is kept for reruns
#
# Set-up it needs once: apt-get install -y qemu-user-static debootstrap binfmt-support (it says so).
# QEMU_CPU=cortex-a72 (a Pi 4's core; qemu's default "max" CPU gave wrong ai-edge-litert int8 results)
# and an ARM /proc/cpuinfo bound over the host's (onnxruntime segfaults on import reading an x86 one).
# Emulated times are NOT Raspberry Pi times: they measure qemu on this host, and are labelled so.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
ROOTFS=$(realpath -m "${ECOS_ARM64_ROOT:-runs/arm64-root}")
W=$(realpath -m "${ECOS_ARM64_WORK:-runs/arm64-check}")   # artifacts and x86 results (gitignored)
OUT=${ECOS_ARM64_RESULT:-docs/results/pi.md}
MIRROR=${ECOS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
B=$REPO/.venv/bin
say() { printf '\n== %s\n' "$*"; }
die() { printf 'check-arm64: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts)"
[ -x "$B/ecos-cloud" ] || die "needs the cloud side in .venv (scripts/setup.sh)"
export QEMU_CPU=cortex-a72
t0=$(date +%s)

say "1. host: qemu-user-static, debootstrap, binfmt for aarch64"
for tool in qemu-aarch64-static debootstrap; do
  command -v $tool >/dev/null || die "$tool missing: apt-get install -y qemu-user-static debootstrap binfmt-support"
done
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 2>/dev/null || die "cannot register qemu-aarch64 with binfmt_misc"
fi
grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "qemu-aarch64 binfmt lacks the F flag (needed in a chroot)"

say "2. Debian bookworm arm64 root in $ROOTFS (cached)"
if [ ! -f "$ROOTFS/.ecos-rootfs-ok" ]; then
  s=$(date +%s)
  if [ ! -x "$ROOTFS/debootstrap/debootstrap" ] && [ ! -x "$ROOTFS/usr/bin/python3.11" ]; then
    rm -rf "$ROOTFS"
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3.11,python3.11-venv,python3-pip \
      bookworm "$ROOTFS" "$MIRROR"
  fi
  [ ! -x "$ROOTFS/debootstrap/debootstrap" ] || chroot "$ROOTFS" /debootstrap/debootstrap --second-stage
  chroot "$ROOTFS" /usr/bin/python3 -c 'import platform, venv; assert platform.machine() == "aarch64"'
  echo "$(( $(date +%s) - s ))" > "$ROOTFS/.ecos-rootfs-ok"  # seconds the build took (for the report)
fi
ROOTFS_S=$(cat "$ROOTFS/.ecos-rootfs-ok")
echo "root built in ${ROOTFS_S:-?} s (cached since)"

mounted=()
cleanup() {
  for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {  # bind SRC DEST (not recursive: nothing mounted below the host's /dev is touched)
  [ -e "$2" ] || mkdir -p "$2"
  mountpoint -q "$2" || { mount --bind "$1" "$2"; mounted+=("$2"); }
}
mountpoint -q "$ROOTFS/proc" || { mount -t proc proc "$ROOTFS/proc"; mounted+=("$ROOTFS/proc"); }
bind /dev "$ROOTFS/dev"
# sysfs: onnxruntime's cpuinfo reads /sys/devices/system/cpu/{possible,present} (it warns and guesses without)
mountpoint -q "$ROOTFS/sys" || { mount -t sysfs sysfs "$ROOTFS/sys"; mounted+=("$ROOTFS/sys"); }
mkdir -p "$W"
printf '%s\n' "processor	: 0" "BogoMIPS	: 108.00" "Features	: fp asimd evtstrm crc32 cpuid" \
  "CPU implementer	: 0x41" "CPU architecture: 8" "CPU variant	: 0x0" "CPU part	: 0xd08" "CPU revision	: 3" "" \
  "processor	: 1" "BogoMIPS	: 108.00" "Features	: fp asimd evtstrm crc32 cpuid" \
  "CPU implementer	: 0x41" "CPU architecture: 8" "CPU variant	: 0x0" "CPU part	: 0xd08" "CPU revision	: 3" "" \
  > "$W/cpuinfo"  # two Cortex-A72 cores (part 0xd08), as a Pi 4 reports them
bind "$W/cpuinfo" "$ROOTFS/proc/cpuinfo"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
# A host whose pip trusts its own CA bundle (a TLS-inspecting proxy, a private index): the same for pip in the root.
HOST_CA=${PIP_CERT:-$($B/python -m pip config get global.cert 2>/dev/null || true)}
ARM_ENV=(PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=$QEMU_CPU PIP_DEFAULT_TIMEOUT=180)
if [ -n "$HOST_CA" ] && [ -f "$HOST_CA" ]; then
  cp "$HOST_CA" "$ROOTFS/etc/ssl/host-ca-bundle.crt"
  ARM_ENV+=(PIP_CERT=/etc/ssl/host-ca-bundle.crt)
  echo "pip in the root trusts the host's CA bundle $HOST_CA"
fi
arm() { chroot "$ROOTFS" /usr/bin/env -i "${ARM_ENV[@]}" "$@"; }
arm grep -q "CPU part	: 0xd08" /proc/cpuinfo || die "the ARM /proc/cpuinfo is not in place"
echo "$(arm uname -m), $(arm python3 -V), QEMU_CPU=$QEMU_CPU, $(qemu-aarch64-static --version | head -1)"

say "3. the device wheel (packaging/device), built on the host"
mkdir -p "$W/dist" "$W/src/packaging"
rm -rf "$W/dist"/*.whl "$W/src/packaging/device" "$W/src/device_sdk"
cp -r packaging/device "$W/src/packaging/device" && cp -r device_sdk "$W/src/device_sdk"
find "$W/src" \( -name __pycache__ -o -name build -o -name '*.egg-info' \) -prune -exec rm -rf {} +
$B/python -m pip wheel -q --no-deps --no-build-isolation "$W/src/packaging/device" -w "$W/dist"
WHEEL=$(ls "$W"/dist/ecos_fleet_device-*.whl)
SOURCE="commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
[ -z "$(git status --porcelain -- device_sdk packaging/device 2>/dev/null)" ] || SOURCE="$SOURCE + uncommitted changes in device_sdk"
echo "$(basename "$WHEEL"): $(du -k "$WHEEL" | cut -f1) KiB"

say "4. install.sh inside the arm64 root: user, venv with [onnx] from the package index, folders, units"
rm -rf "$ROOTFS/tmp/ecos-pi" && cp -r examples/raspberry_pi "$ROOTFS/tmp/ecos-pi" && cp "$WHEEL" "$ROOTFS/tmp/"
arm rm -rf /opt/ecos/venv  # a clean venv each run: the install is what is measured (pip's cache stays)
[ "${ECOS_ARM64_COLD:-0}" = 1 ] && rm -rf "$ROOTFS/root/.cache/pip"   # ECOS_ARM64_COLD=1: time the downloads too
PIP_CACHE=warm; [ -n "$(ls -A "$ROOTFS/root/.cache/pip" 2>/dev/null)" ] || PIP_CACHE=cold
s=$(date +%s)
arm bash /tmp/ecos-pi/install.sh --wheel "/tmp/$(basename "$WHEEL")" --device-id pi-arm64 2>&1 | sed 's/^/   /'
install_s=$(( $(date +%s) - s ))
arm /opt/ecos/venv/bin/python -m pip check
PKGS=$(arm /opt/ecos/venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -iE '^(numpy|pillow|onnxruntime|cryptography|paho-mqtt|ecos-fleet-device)==' | tr '\n' ' ')
VENV_MB=$(du -sm "$ROOTFS/opt/ecos/venv" | cut -f1)
ORT_MB=$(du -sm "$ROOTFS"/opt/ecos/venv/lib/python3*/site-packages/onnxruntime | cut -f1)
echo "venv: $VENV_MB MB (onnxruntime $ORT_MB MB); $PKGS"
arm id ecos
arm stat -c '%a %U:%G %n' /etc/ecos/device.env /var/lib/ecos/state /var/lib/ecos/device.toml

say "5. artifacts on x86 (cached in $W/art): generated digits, a small encoder, a signed probe, a small classifier"
A=$W/art
mkdir -p "$A"
[ -f "$A/data/dataset.json" ] || nice $B/ecos-make-digits "$A/data" --per-domain 60 --domains handwritten,printed,lcd \
  --device-local 40 --device-test 20 --workers 1 -q
[ -f "$A/encoder.onnx" ] || nice $B/ecos-cloud train-encoder "$A/data/pool" --out "$A/encoder.onnx" --feature-dim 16 \
  --width 8 --epochs 2 --threads 1 -q
$B/ecos-cloud keys show --keys-dir "$A/keys" >/dev/null
[ -f "$A/round.probe" ] || nice $B/ecos-cloud index "$A/data/pool" --encoder "$A/encoder.onnx" --out "$A/pool.index.npz" \
  --probe "$A/round.probe" --k 8 --iters 5 --threads 1 --signing-key "$A/keys/cloud_ed25519.pem" -q
[ -f "$A/teacher.safetensors" ] || nice $B/ecos-cloud train-teacher "$A/data/pool" --out "$A/teacher.safetensors" \
  --width 8 --epochs 12 --threads 1 -q
[ -f "$A/selection.csv" ] || $B/ecos-cloud sample --index "$A/pool.index.npz" --method random --budget 60 \
  --out "$A/selection.csv" -q
[ -f "$A/student/student.onnx" ] || nice $B/ecos-cloud export "$A/teacher.safetensors" --selection "$A/selection.csv" \
  --out-dir "$A/student" --formats onnx --min-agreement 0 --max-drop 100 --threads 1 -q
ls -l "$A/encoder.onnx" "$A/round.probe" "$A"/student/*.onnx | awk '{print "   " $5 " " $9}'
rm -rf "$ROOTFS/tmp/art" && mkdir -p "$ROOTFS/tmp/art"
cp -r "$A/encoder.onnx" "$A/round.probe" "$A/keys" "$A/student" "$ROOTFS/tmp/art/"
cp -r "$A/data/devices/lcd" "$ROOTFS/tmp/art/lcd"
cp "$REPO/scripts/arm64_features.py" "$ROOTFS/tmp/art/"
cp "$A/keys/cloud_ed25519.pub.pem" "$ROOTFS/var/lib/ecos/keys/cloud_ed25519.pub.pem"
cp "$A/encoder.onnx" "$ROOTFS/var/lib/ecos/models/encoder.onnx"
rm -rf "$ROOTFS/var/lib/ecos/data/local/lcd" && cp -r "$A/data/devices/lcd/local" "$ROOTFS/var/lib/ecos/data/local/lcd"
arm chmod -R g+rX,o-rwx /var/lib/ecos/keys /var/lib/ecos/models /var/lib/ecos/data
arm chgrp -R ecos /var/lib/ecos/keys /var/lib/ecos/models /var/lib/ecos/data

# timed NAME CMD...: run CMD inside the root, record wall time and peak RSS (of the qemu process)
declare -A WALL RSS
timed() {
  local name=$1; shift
  local out
  out=$(arm /opt/ecos/venv/bin/python /tmp/art/arm64_features.py --time -- "$@") || { echo "$out"; die "$name failed"; }
  echo "$out" | sed '$d' | sed 's/^/   /'
  read -r WALL[$name] RSS[$name] <<<"$(echo "$out" | tail -1)"
  echo "   [$name: ${WALL[$name]} s emulated wall, peak RSS ${RSS[$name]} MB]"
}

say "6. arm64: ecos-device --version, score, predict (fp32 and int8), the features of the device's images"
timed version /opt/ecos/venv/bin/ecos-device --version
arm rm -f /tmp/art/lcd.scores /tmp/art/lcd.ledger.json
timed score /opt/ecos/venv/bin/ecos-device score /tmp/art/lcd/local --encoder /tmp/art/encoder.onnx \
  --probe /tmp/art/round.probe --out /tmp/art/lcd.scores --ledger /tmp/art/lcd.ledger.json --device-id lcd \
  --epsilon 0.58 --trusted-key /tmp/art/keys/cloud_ed25519.pub.pem
for m in student student.int8; do
  timed "predict_$m" /opt/ecos/venv/bin/ecos-device predict /tmp/art/student/$m.onnx --folder /tmp/art/lcd/test
  arm /opt/ecos/venv/bin/ecos-device predict /tmp/art/student/$m.onnx --folder /tmp/art/lcd/test --show --json \
    > "$W/arm64.predict.$m.json"
done
timed features /opt/ecos/venv/bin/python /tmp/art/arm64_features.py --encode /tmp/art/encoder.onnx /tmp/art/lcd/local \
  /tmp/art/round.probe /tmp/art/arm64.features.npz
cp "$ROOTFS/tmp/art/arm64.features.npz" "$W/"

say "7. x86 (this host, .venv): the same features and predictions; score's time and memory for reference"
x86=$($B/python scripts/arm64_features.py --time -- $B/ecos-device score "$A/data/devices/lcd/local" \
  --encoder "$A/encoder.onnx" --probe "$A/round.probe" --out "$W/x86.lcd.scores" --ledger "$W/x86.lcd.ledger.$$.json" \
  --device-id lcd --epsilon 0.58 --trusted-key "$A/keys/cloud_ed25519.pub.pem" | tail -1)
rm -f "$W/x86.lcd.ledger.$$.json"*
echo "   x86 score: $x86 (wall s, peak RSS MB)"
$B/python scripts/arm64_features.py --encode "$A/encoder.onnx" "$A/data/devices/lcd/local" "$A/round.probe" \
  "$W/x86.features.npz"
for m in student student.int8; do
  (cd "$A" && $B/ecos-device predict student/$m.onnx --folder data/devices/lcd/test --show --json) > "$W/x86.predict.$m.json"
done
COMPARE=$($B/python scripts/arm64_features.py --compare "$W/x86.features.npz" "$W/arm64.features.npz" \
  "$W/x86.predict.student.json" "$W/arm64.predict.student.json" \
  "$W/x86.predict.student.int8.json" "$W/arm64.predict.student.int8.json")
echo "$COMPARE"

say "8. agent round: ecos-device run (arm64, the installed unit's command) against the broker on 127.0.0.1:1883"
ROUND="not run"
# a new device each run (a fresh id, so no retained message of an earlier run interferes): a fresh state
# folder, as the ledger records the id it belongs to and refuses another
arm find /var/lib/ecos/state -mindepth 1 -delete
if $B/python -c 'import socket,sys; s=socket.socket(); s.settimeout(2); sys.exit(s.connect_ex(("127.0.0.1",1883)))'; then
  ROUND=$($B/python scripts/arm64_features.py --round "$ROOTFS" "$A" 2>&1 | tee /dev/stderr | tail -1) || true
else
  ROUND="skipped: nothing listens on 127.0.0.1:1883"
fi
echo "$ROUND"

say "9. $OUT"
total_s=$(( $(date +%s) - t0 ))
$B/python scripts/arm64_features.py --report "$OUT" \
  --set "wheel=$(basename "$WHEEL")" --set "wheel_kib=$(du -k "$WHEEL" | cut -f1)" --set "venv_mb=$VENV_MB" \
  --set "ort_mb=$ORT_MB" --set "pkgs=$PKGS" --set "install_s=$install_s" --set "total_s=$total_s" \
  --set "qemu=$(qemu-aarch64-static --version | head -1)" --set "python=$(arm python3 -V)" \
  --set "host=$(uname -m), $(nproc) cores, $(. /etc/os-release && echo "$PRETTY_NAME"), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)" \
  --set "rootfs_s=$ROOTFS_S" --set "pip_cache=$PIP_CACHE" --set "source=$SOURCE" \
  --set "round=$ROUND" --set "compare=$COMPARE" --set "x86_score=$x86" \
  --set "times=$(for k in version score predict_student predict_student.int8 features; do printf '%s=%s/%s;' $k "${WALL[$k]}" "${RSS[$k]}"; done)"
echo "wrote $OUT"
case "$ROUND" in agent*) ;; *) die "the agent round did not complete: $ROUND" ;; esac
