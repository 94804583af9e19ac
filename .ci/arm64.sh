#!/usr/bin/env bash
# The board side on an emulated aarch64 board: an arm64 Debian (debootstrap) run through
# qemu-user-static and binfmt_misc, with the onnxruntime a JetPack 6 board gets from pip
# (1.23.2, the last aarch64 wheel for its Python 3.10; the rootfs is Debian 12's Python 3.11,
# which the same release serves). There it runs tests/board on the small bundles the host
# exported (a digits MLP, conv net and transformer block: doctor, adapt against ORT-training's
# loss curve, kill + --resume, eval, merge) and checks the loss curve and the update against the
# x86_64 board venv's run to 1e-5; and the board-reading code (profiles, INA3221 sysfs, nvpmodel,
# memory) on the same fake sysfs trees as on x86_64.
#
# Needs: root (chroot, mount, binfmt_misc), apt, and the fixtures and x86_64 records that
# `make test-board` leaves in build/board-fixtures. Where it cannot run (not root, no
# binfmt_misc, no apt, or an aarch64 machine, which runs `make test-board` natively) it says
# so and exits 0; any other failure fails. The rootfs and its venv are cached in
# $TASKEDGE_ARM64_CACHE (default /var/cache/taskedge): the first run takes minutes, later ones
# only the tests.
#
# What this proves: the runtime's aarch64 CPU path with the JetPack 6 onnxruntime wheel.
# What it does not: the CUDA execution provider, real power rails, real timings (emulated).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ORT=${ARM64_ORT:-1.23.2}
CACHE=${TASKEDGE_ARM64_CACHE:-/var/cache/taskedge}
ROOT="$CACHE/arm64-bookworm"
VENV=/opt/board-venv-$ORT
FIX=$(realpath -m "${TASKEDGE_BOARD_FIXTURES:-build/board-fixtures}")
TASKS=${ARM64_TASKS:-mlp,cnn,transformer}
X86="$FIX/records/x86_64-ort$ORT"
log() { echo "[arm64] $*" >&2; }
skip() { log "SKIPPED: $* -- the aarch64 board path was not checked"; exit 0; }

[ "$(uname -m)" != aarch64 ] || skip "this machine is aarch64 itself: make test-board runs the board side natively"
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, chroot, mount, binfmt_misc); run as root or in CI"
[ -f "$FIX/board.json" ] && [ -d "$X86" ] || {
  log "no x86_64 reference in $X86: run 'make test-board' (with onnxruntime $ORT) first"; exit 1; }

if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
  command -v apt-get >/dev/null || skip "no apt-get to install qemu-user-static and debootstrap"
  log "installing qemu-user-static, binfmt-support, debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    qemu-user-static binfmt-support debootstrap >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
  || skip "binfmt_misc cannot be mounted here (a container without it cannot run foreign binaries)"
update-binfmts --enable qemu-aarch64 2>/dev/null || true
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
  || skip "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"

t0=$SECONDS
if [ ! -f "$ROOT/.taskedge-complete" ]; then
  MIRROR=${ARM64_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  log "building an arm64 Debian 12 rootfs in $ROOT from $MIRROR (once; a few minutes)"
  rm -rf "$ROOT.tmp" && mkdir -p "$CACHE"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$ROOT.tmp" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; log "debootstrap failed (log: $CACHE/debootstrap.log)"; exit 1; }
  touch "$ROOT.tmp/.taskedge-complete"
  rm -rf "$ROOT" && mv "$ROOT.tmp" "$ROOT"
fi

MOUNTS=()
cleanup() { for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
bind() { mkdir -p "$ROOT$2"; mount "${@:3}" "$1" "$ROOT$2"; MOUNTS+=("$ROOT$2"); }
bind proc /proc -t proc
bind sysfs /sys -t sysfs
bind /dev /dev --bind
bind "$REPO" "$REPO" --bind
[[ "$FIX" == "$REPO"/* ]] || bind "$FIX" "$FIX" --bind
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-bundle.crt"   # the host's trust (proxies)
board() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 OMP_NUM_THREADS=2 \
            PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 "$@"; }

if [ ! -f "$ROOT$VENV/.taskedge-complete" ]; then
  log "arm64 venv $VENV: onnxruntime==$ORT numpy psutil pytest (once; about a minute emulated)"
  rm -rf "$ROOT$VENV"
  board /usr/bin/python3 -m venv "$VENV"
  board "$VENV/bin/pip" install -q "onnxruntime==$ORT" numpy psutil pytest
  touch "$ROOT$VENV/.taskedge-complete"
fi
log "rootfs and venv ready in $((SECONDS - t0)) s"

# the runtime as the board gets it: a wheel built here, installed without dependencies
WHEELS="$REPO/build/arm64-wheel"
rm -rf "$WHEELS"
"${PY:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" . >/dev/null
board "$VENV/bin/pip" install -q --no-deps --force-reinstall "$WHEELS"/taskedge-*.whl
board "$VENV/bin/python" -c 'import platform, onnxruntime as o; print("[arm64] board venv:", platform.machine(),
  "python", platform.python_version(), "onnxruntime", o.__version__, o.get_available_providers())'

t1=$SECONDS
board /bin/sh -c "cd '$REPO' && TASKEDGE_BOARD_FIXTURES='$FIX' TASKEDGE_BOARD_TASKS='$TASKS' \
  TASKEDGE_BOARD_COMPARE='$X86' '$VENV/bin/python' -m pytest -q -p no:cacheprovider -rs $* \
  tests/board tests/test_profiles.py tests/test_telemetry.py tests/test_probe.py tests/test_doctor.py"
log "tests passed in $((SECONDS - t1)) s (emulated aarch64; $((SECONDS - t0)) s in all)"
