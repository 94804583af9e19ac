#!/usr/bin/env bash
# TaskEdge board installer (tools/install.sh, shipped in the archive by `taskedge pack`).
# Needs bash, tar and Python >= 3.9 with venv.
#
#   bash install.sh --tar bundle.tar [--prefix ~/taskedge] [--python python3]
#                   [--no-deps] [--system-site-packages] [--ort-wheel PATH] [--task-name NAME]
#   (read it straight from the archive: tar -xOf bundle.tar install.sh | bash -s -- --tar bundle.tar)
#
# 1. unpacks the archive safely into PREFIX/release (no absolute paths, no '..', no links leaving
#    the folder, no device files) and checks every file against SHA256SUMS; the previous release is
#    replaced only once the new one is verified;
# 2. creates the venv PREFIX/venv (once) and pip-installs the runtime wheel from release/wheels:
#    `pip install WHEEL[board]` (numpy, psutil and the CPU onnxruntime wheel, aarch64 or x86_64) if the
#    venv has no onnxruntime yet; plain `pip install WHEEL` if it has one (e.g. NVIDIA's onnxruntime-gpu
#    from --ort-wheel or --system-site-packages), so pip never puts the CPU build over it;
# 3. prints the commands to run. PREFIX/runs is the place for checkpoints (survives re-flashing).
# The runtime needs an onnxruntime inference build (>= 1.17), never onnxruntime-training or torch.
#
# --no-deps               install only the runtime wheel, no dependencies and no index: for an offline
#                         board whose --python already has numpy, psutil, onnxruntime (tomli below 3.11);
#                         use it with --system-site-packages (an --ort-wheel is then installed --no-deps).
# --system-site-packages  the venv sees the packages of --python: `python -m venv
#                         --system-site-packages`, and if --python is itself a venv, its
#                         site-packages are added through a .pth file (venvs do not chain).
# --ort-wheel PATH        pip install this onnxruntime wheel first: for the CUDA EP on a Jetson,
#                         NVIDIA's onnxruntime-gpu wheel for your JetPack (Jetson Zoo /
#                         pypi.jetson-ai-lab); the runtime wheel then goes in without the extra.
# --task-name NAME        the bundle's name in the task store PREFIX/store (default: default); its base
#                         is stored there once, and `taskedge flash TASK.tar` adds more tasks over it.
set -euo pipefail
exec 1>&2   # progress goes to stderr; stdout stays free for the caller (e.g. doctor --json)

TAR="" PREFIX="${HOME}/taskedge" PY="python3" NODEPS=0 SYSSITE=0 ORTWHEEL="" TASKNAME="default"
while [ $# -gt 0 ]; do
  case "$1" in
    --tar) TAR="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-deps) NODEPS=1; shift ;;
    --system-site-packages) SYSSITE=1; shift ;;
    --ort-wheel) ORTWHEEL="$2"; shift 2 ;;
    --task-name) TASKNAME="$2"; shift 2 ;;
    -h|--help) sed -n '2,29p' "$0" 2>/dev/null || true; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)"; exit 2 ;;
  esac
done
case "$PREFIX" in "~") PREFIX="$HOME" ;; "~/"*) PREFIX="$HOME/${PREFIX#\~/}" ;; esac
[ -n "$TAR" ] || { echo "install.sh: give --tar bundle.tar (the archive made by taskedge pack)"; exit 2; }
[ -f "$TAR" ] || { echo "install.sh: archive not found: $TAR"; exit 2; }
command -v tar >/dev/null 2>&1 || { echo "install.sh: tar not found; install it (apt-get install tar)"; exit 2; }
command -v "$PY" >/dev/null 2>&1 || { echo "install.sh: python not found: $PY (pass --python /path/to/python3)"; exit 2; }
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
  || { echo "install.sh: $PY is older than Python 3.9 (the runtime needs 3.9+); pass --python with a newer one"; exit 2; }
mkdir -p "$PREFIX/runs"
PREFIX="$(cd "$PREFIX" && pwd -P)"

echo "[1/3] unpacking $TAR -> $PREFIX/release (safe extraction, sha256 check)"
# the archive's installer/unpack.py (standard library + fsutil.py) checks and extracts it; -E keeps
# PYTHON* variables out, so the script's own folder is on sys.path and `import fsutil` finds its copy
HELPERS="$(mktemp -d)"; trap 'rm -rf "$HELPERS"' EXIT
for f in unpack.py fsutil.py; do
  tar -xOf "$TAR" "installer/$f" > "$HELPERS/$f" 2>/dev/null && [ -s "$HELPERS/$f" ] \
    || { echo "install.sh: $TAR has no installer/$f; re-create it with this version's taskedge pack"; exit 2; }
done
"$PY" -E "$HELPERS/unpack.py" "$TAR" "$PREFIX/release"

VENV="$PREFIX/venv"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[2/3] creating venv $VENV"
  if [ "$SYSSITE" = 1 ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
else
  echo "[2/3] reusing venv $VENV"
fi
if [ "$SYSSITE" = 1 ]; then
  SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PY" -c 'import site, sys
if sys.prefix != sys.base_prefix:
    print("\n".join(p for p in site.getsitepackages()))' > "$SITE/_taskedge_inherit.pth"
  [ -s "$SITE/_taskedge_inherit.pth" ] || rm -f "$SITE/_taskedge_inherit.pth"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
if [ -n "$ORTWHEEL" ]; then
  echo "      installing ONNX Runtime wheel $ORTWHEEL"
  if [ "$NODEPS" = 1 ]; then "${PIP[@]}" install -q --no-deps "$ORTWHEEL"; else "${PIP[@]}" install -q "$ORTWHEEL"; fi
fi
WHEEL="$(ls "$PREFIX"/release/wheels/taskedge-*.whl | head -n 1)"
# does the venv already see an onnxruntime (onnxruntime-gpu, a CPU wheel, an inherited one)?
has_ort() { "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("onnxruntime") is None)'; }
"${PIP[@]}" uninstall -q -y taskedge >/dev/null 2>&1 || true
if [ "$NODEPS" = 1 ]; then
  echo "[3/3] installing $(basename "$WHEEL") (--no-deps)"
  "${PIP[@]}" install -q --no-deps --no-index "$WHEEL"
elif has_ort; then
  echo "[3/3] installing $(basename "$WHEEL") (keeping the venv's onnxruntime)"
  "${PIP[@]}" install -q "$WHEEL"
else
  echo "[3/3] installing $(basename "$WHEEL")[board] (with the CPU onnxruntime wheel)"
  "${PIP[@]}" install -q "$WHEEL[board]"
fi
has_ort || { echo "install.sh: no onnxruntime in $VENV: run without --no-deps, or pass --ort-wheel PATH"; exit 1; }
"$VENV/bin/python" -c 'import sys, taskedge.runtime.trainer
assert not [m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith("onnxruntime.training")]' \
  || { echo "install.sh: the runtime does not import (or it loaded torch); see the output above"; exit 1; }

# the release's bundle is also a task in the store (PREFIX/store): its base is stored once (hard-linked),
# and task packs flashed later (taskedge flash TASK.tar) add tasks over it without sending the base again
"$VENV/bin/taskedge" task add "$PREFIX/release/bundle" --name "$TASKNAME" --store "$PREFIX/store" --replace \
  || echo "install.sh: note: the bundle was not added to the task store (see above); adapt it as a folder"
echo "installed. Next:"
echo "  $VENV/bin/taskedge doctor --profile $PREFIX/release/profile.toml"
echo "  $VENV/bin/taskedge adapt $PREFIX/release/bundle --profile $PREFIX/release/profile.toml \\"
echo "      --data DATA.npz --run-dir $PREFIX/runs/\$(date +%Y%m%d-%H%M%S)"
