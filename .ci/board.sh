#!/usr/bin/env bash
# The board side in a venv of its own: plain onnxruntime (the newest, or ORT_VERSION=1.23.2 ...),
# numpy and psutil only -- no torch, no onnx, no onnxruntime-training. The host venv (.venv, built by
# `make venv`) exports the bundles and ORT-training's reference loss curves it is checked against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FIX=${TASKEDGE_BOARD_FIXTURES:-build/board-fixtures}
BOARD=${BOARD_VENV:-.venv-board}
STEPS=${BOARD_STEPS:-50}
rm -rf "$FIX"
"$PY" -m taskedge.tools.board_check "$FIX" --steps "$STEPS"
if [ ! -x "$BOARD/bin/python" ]; then python3 -m venv "$BOARD"; fi
PIP=("$BOARD/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "onnxruntime${ORT_VERSION:+==$ORT_VERSION}" numpy psutil pytest 'tomli; python_version < "3.11"'
"${PIP[@]}" --no-deps --force-reinstall .
"$BOARD/bin/python" -c 'import onnxruntime as o; print("board venv: onnxruntime", o.__version__, o.get_available_providers())'
TASKEDGE_BOARD_FIXTURES="$FIX" "$BOARD/bin/python" -m pytest -q -p no:cacheprovider -rs tests/board "$@"
