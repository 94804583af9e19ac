#!/usr/bin/env bash
# The board side in venvs of its own: plain onnxruntime, numpy and psutil only -- no torch, no onnx,
# no onnxruntime-training. Run against the newest onnxruntime and 1.23.2 (the last aarch64 wheel for
# JetPack 6's Python 3.10); ORT_VERSIONS="latest 1.23.2" by default. The host venv (.venv, `make venv`)
# exports the bundles and ORT-training's reference loss curves they are checked against.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
FIX=${TASKEDGE_BOARD_FIXTURES:-build/board-fixtures}
STEPS=${BOARD_STEPS:-50}
rm -rf "$FIX"
"$PY" -m taskedge.tools.board_check "$FIX" --steps "$STEPS"
for version in ${ORT_VERSIONS:-latest 1.23.2}; do
  BOARD=".venv-board-$version"
  [ -x "$BOARD/bin/python" ] || python3 -m venv "$BOARD"
  spec=onnxruntime; [ "$version" = latest ] || spec="onnxruntime==$version"
  PIP=("$BOARD/bin/python" -m pip install -q --disable-pip-version-check)
  "${PIP[@]}" --upgrade "$spec" numpy psutil pytest 'tomli; python_version < "3.11"'
  "${PIP[@]}" --no-deps --force-reinstall .
  "$BOARD/bin/python" -c 'import onnxruntime as o; print("board venv: onnxruntime", o.__version__, o.get_available_providers())'
  # the bundles, and the code that reads a board (profiles, INA3221 sysfs, nvpmodel, memory) on fake sysfs trees
  TASKEDGE_BOARD_FIXTURES="$FIX" "$BOARD/bin/python" -m pytest -q -p no:cacheprovider -rs "$@" \
    tests/board tests/test_profiles.py tests/test_telemetry.py tests/test_probe.py tests/test_doctor.py
done
