#!/usr/bin/env bash
# Install the ECOS device agent on a Raspberry Pi (or any systemd Linux): see README.md in this folder.
# Run it again at any time: it repairs modes and owners, upgrades the wheel, replaces the program
# files and units, and never overwrites device.toml or the credentials file once they exist.
set -euo pipefail

# The layout; ecos-device.service, ecos-camera.service and README.md use the same
# (tests/test_raspberry_pi_example.py checks that they agree).
ECOS_USER=ecos
ECOS_GROUP=ecos
PREFIX=/opt/ecos                  # venv/, app.py, README.md: program files, root's
STATE_DIR=/var/lib/ecos           # device.toml, keys/, models/, data/local/: read-only to the agent
WRITABLE_DIR=/var/lib/ecos/state  # ledger and model store: the only folder the agent writes
CAMERA_DIR=/var/lib/ecos/data/local/camera  # frames the camera app keeps (it writes there too)
ETC_DIR=/etc/ecos
CREDENTIALS=/etc/ecos/device.env  # ECOS_DEVICE_BROKER_PASSWORD=...: root's, mode 0600
UNIT_DIR=/etc/systemd/system
UNITS=(ecos-device.service ecos-camera.service)

usage() {
  cat <<EOF
Usage: sudo $0 [OPTIONS]

Install the ECOS device agent as a systemd service:
  * the system user and group '$ECOS_USER' (no login, no home of its own);
  * a venv in $PREFIX/venv with the device wheel ecos-fleet-device (no torch, no cloud code);
  * $STATE_DIR: device.toml (from the example, written once), keys/, models/, data/local/
    (read-only to the agent), state/ (ledger and model store, writable by '$ECOS_USER' only);
  * $CREDENTIALS for secrets such as ECOS_DEVICE_BROKER_PASSWORD (root only, mode 0600; written once);
  * $PREFIX/app.py (the camera example) and README.md;
  * the units $UNIT_DIR/ecos-device.service and ecos-camera.service (enable one of them);
  * enables systemd-time-wait-sync.service, so that time-sync.target waits for a synchronised
    clock (probe deadlines are wall-clock times and a Pi has no real-time clock).
It starts nothing: afterwards, 'sudo systemctl enable --now ecos-device'. Running it again is safe.

Options:
  --wheel PATH            the device wheel (pip wheel --no-deps ./packaging/device -w dist/)
  --package SPEC          install this pip requirement instead (default: ecos-fleet-device, or
                          ./packaging/device of a checkout); --wheel wins
  --extra NAME            the inference runtime extra: onnx (default), litert, or tflite (armv7)
  --python PY             the Python for the venv (default python3; 3.9 or newer)
  --system-site-packages  let the venv see apt's packages (python3-picamera2 for the camera app)
  --device-id ID          device_id written to a new device.toml (default: the host name)
  --cloud-key FILE        copy the cloud's Ed25519 public key to $STATE_DIR/keys/cloud_ed25519.pub.pem
  --encoder FILE          copy the provisioned encoder to $STATE_DIR/models/encoder.onnx
  --password-stdin        read the broker password from stdin into $CREDENTIALS
  --no-venv               do not create or update the venv
  --no-time-wait          do not enable systemd-time-wait-sync.service
  --root DIR              install into DIR instead of / (image builds, tests): creates no user,
                          changes no owner, runs no systemctl, and implies --no-venv (a venv
                          cannot be moved; build it on the device or inside a chroot)
  --dry-run               print what would be done, change nothing
  -h, --help              show this help
EOF
}

WHEEL="" PACKAGE="" EXTRA=onnx PY=python3 SITE="" DEVICE_ID="" CLOUD_KEY="" ENCODER="" PASSWORD_STDIN=0
NO_VENV=0 TIME_WAIT=1 ROOT="" DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) WHEEL=$2; shift 2 ;;
    --package) PACKAGE=$2; shift 2 ;;
    --extra) EXTRA=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    --system-site-packages) SITE=--system-site-packages; shift ;;
    --device-id) DEVICE_ID=$2; shift 2 ;;
    --cloud-key) CLOUD_KEY=$2; shift 2 ;;
    --encoder) ENCODER=$2; shift 2 ;;
    --password-stdin) PASSWORD_STDIN=1; shift ;;
    --no-venv) NO_VENV=1; shift ;;
    --no-time-wait) TIME_WAIT=0; shift ;;
    --root) ROOT=${2%/}; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

HERE=$(cd "$(dirname "$0")" && pwd)
die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "== $*"; }
run() {  # print a command, then run it unless --dry-run
  echo "   $*"
  [ "$DRY" = 1 ] || "$@"
}
case "$EXTRA" in onnx|litert|tflite) ;; *) die "--extra must be onnx, litert or tflite, not '$EXTRA'" ;; esac
[ -z "$WHEEL" ] || [ -f "$WHEEL" ] || die "wheel not found: $WHEEL"
[ -z "$CLOUD_KEY" ] || [ -f "$CLOUD_KEY" ] || die "cloud key not found: $CLOUD_KEY"
[ -z "$ENCODER" ] || [ -f "$ENCODER" ] || die "encoder not found: $ENCODER"
if [ -z "$DEVICE_ID" ]; then
  DEVICE_ID=$(hostname 2>/dev/null | tr -c 'A-Za-z0-9_.\n-' '_' | cut -c1-64)
fi
[[ "$DEVICE_ID" =~ ^[A-Za-z0-9_.-]{1,64}$ ]] || die "device id '$DEVICE_ID' is not 1-64 of A-Z a-z 0-9 _ . -"
if [ -n "$ROOT" ]; then
  [ -d "$ROOT" ] || die "--root $ROOT is not a folder"
  ROOT=$(cd "$ROOT" && pwd)
  NO_VENV=1
elif [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
  die "run it as root (sudo), or try --dry-run / --root DIR"
fi
R=${ROOT}  # prefix of every path written

# mkdir_ MODE OWNER GROUP PATH: create or repair a folder (owners only on a real install)
mkdir_() {
  if [ -n "$ROOT" ]; then run install -d -m "$1" "$R$4"; else run install -d -m "$1" -o "$2" -g "$3" "$4"; fi
}
# put MODE OWNER GROUP SRC DEST: copy a file (replacing it)
put() {
  if [ -n "$ROOT" ]; then run install -m "$1" "$4" "$R$5"; else run install -m "$1" -o "$2" -g "$3" "$4" "$R$5"; fi
}
# fix MODE OWNER GROUP PATH: mode and owner of an existing file
fix() {
  run chmod "$1" "$R$4"
  [ -n "$ROOT" ] || run chown "$2:$3" "$R$4"
}

say "1. user and group '$ECOS_USER'"
if [ -n "$ROOT" ]; then
  echo "   (--root: not creating users; the units run as User=$ECOS_USER)"
elif id -u "$ECOS_USER" >/dev/null 2>&1; then
  echo "   exists: $(id "$ECOS_USER")"
else
  getent group "$ECOS_GROUP" >/dev/null || run groupadd --system "$ECOS_GROUP"
  run useradd --system --gid "$ECOS_GROUP" --home-dir "$STATE_DIR" --no-create-home \
    --shell /usr/sbin/nologin --comment "ECOS device agent" "$ECOS_USER"
fi
if [ -z "$ROOT" ] && getent group video >/dev/null && ! id -nG "$ECOS_USER" 2>/dev/null | grep -qw video; then
  run usermod -a -G video "$ECOS_USER"  # camera devices, for ecos-camera.service
fi

say "2. folders"
mkdir_ 0755 root root "$PREFIX"
mkdir_ 0750 root "$ECOS_GROUP" "$ETC_DIR"
mkdir_ 0750 root "$ECOS_GROUP" "$STATE_DIR"
for d in keys models data data/local; do mkdir_ 0750 root "$ECOS_GROUP" "$STATE_DIR/$d"; done
mkdir_ 0700 "$ECOS_USER" "$ECOS_GROUP" "$WRITABLE_DIR"
mkdir_ 0700 "$ECOS_USER" "$ECOS_GROUP" "$CAMERA_DIR"
mkdir_ 0755 root root "$UNIT_DIR"

say "3. configuration: $STATE_DIR/device.toml"
if [ -e "$R$STATE_DIR/device.toml" ]; then
  echo "   exists, kept (edit it, or remove it to start again from the example)"
else
  tmp=$(mktemp)
  sed "s/^device_id = \"[^\"]*\"/device_id = \"$DEVICE_ID\"/" "$HERE/device.toml" > "$tmp"
  put 0640 root "$ECOS_GROUP" "$tmp" "$STATE_DIR/device.toml"
  rm -f "$tmp"
fi
[ "$DRY" = 1 ] || [ ! -e "$R$STATE_DIR/device.toml" ] || fix 0640 root "$ECOS_GROUP" "$STATE_DIR/device.toml"
[ -z "$CLOUD_KEY" ] || put 0640 root "$ECOS_GROUP" "$CLOUD_KEY" "$STATE_DIR/keys/cloud_ed25519.pub.pem"
[ -z "$ENCODER" ] || put 0640 root "$ECOS_GROUP" "$ENCODER" "$STATE_DIR/models/encoder.onnx"

say "4. credentials: $CREDENTIALS (root only)"
password=""
if [ "$PASSWORD_STDIN" = 1 ]; then
  IFS= read -r password || true
  [ -n "$password" ] || die "--password-stdin: no password on stdin"
  [[ "$password" != *$'\n'* && "$password" != *"'"* ]] || die "--password-stdin: the password may not hold a quote"
fi
if [ "$DRY" = 1 ]; then
  echo "   (would create it if missing, mode 0600, and set ECOS_DEVICE_BROKER_PASSWORD if --password-stdin)"
else
  (
    umask 077  # never readable by others, not even for a moment
    f=$R$CREDENTIALS
    if [ ! -e "$f" ]; then
      printf '%s\n' "# Secrets of the ECOS device agent, read by systemd (EnvironmentFile=) as root." \
        "# ECOS_DEVICE_<TABLE>_<KEY>=value overrides device.toml, e.g.:" \
        "# ECOS_DEVICE_BROKER_PASSWORD=..." > "$f"
      echo "   created"
    else
      echo "   exists, kept"
    fi
    if [ -n "$password" ]; then
      grep -v '^ECOS_DEVICE_BROKER_PASSWORD=' "$f" > "$f.tmp" || true
      printf "ECOS_DEVICE_BROKER_PASSWORD='%s'\n" "$password" >> "$f.tmp"
      mv "$f.tmp" "$f"
      echo "   broker password set"
    fi
  )
  fix 0600 root root "$CREDENTIALS"
fi

say "5. venv: $PREFIX/venv"
if [ "$NO_VENV" = 1 ]; then
  echo "   skipped (--no-venv${ROOT:+ / --root})"
else
  "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || die "$PY is older than 3.9"
  "$PY" -c 'import venv, ensurepip' 2>/dev/null || die "$PY has no venv/ensurepip: sudo apt install python3-venv"
  if [ ! -x "$PREFIX/venv/bin/python" ]; then
    run "$PY" -m venv $SITE "$PREFIX/venv"
  fi
  if [ -n "$WHEEL" ]; then
    spec="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")[$EXTRA]"
  elif [ -n "$PACKAGE" ]; then
    spec=$PACKAGE
  elif [ -f "$HERE/../../packaging/device/pyproject.toml" ]; then
    spec="$(cd "$HERE/../../packaging/device" && pwd)[$EXTRA]"
  else
    spec="ecos-fleet-device[$EXTRA]"
  fi
  run "$PREFIX/venv/bin/python" -m pip install --disable-pip-version-check -q --upgrade "$spec"
  [ "$DRY" = 1 ] || "$PREFIX/venv/bin/ecos-device" --version
fi

say "6. program files and units"
put 0644 root root "$HERE/app.py" "$PREFIX/app.py"
put 0644 root root "$HERE/README.md" "$PREFIX/README.md"
for unit in "${UNITS[@]}"; do put 0644 root root "$HERE/$unit" "$UNIT_DIR/$unit"; done
if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
  run systemctl daemon-reload
  if [ "$TIME_WAIT" = 1 ] && systemctl cat systemd-time-wait-sync.service >/dev/null 2>&1; then
    run systemctl enable systemd-time-wait-sync.service
  fi
else
  echo "   (systemd is not running here${ROOT:+ / --root}: no daemon-reload, nothing enabled)"
fi

say "done"
cat <<EOF
Next:
  * the cloud's public key in $STATE_DIR/keys/cloud_ed25519.pub.pem, the encoder in $STATE_DIR/models/
    (or --cloud-key / --encoder), local images under $STATE_DIR/data/local/;
  * edit $STATE_DIR/device.toml ([broker]) and, for a password, $CREDENTIALS;
  * sudo systemctl enable --now ecos-device      (or ecos-camera, the camera app: one of the two)
  * journalctl -u ecos-device -f;   systemd-analyze security ecos-device
EOF
