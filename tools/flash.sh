#!/usr/bin/env bash
# TaskEdge flash: copy a `taskedge pack` archive to a board over ssh, install it, run the doctor.
#
#   tools/flash.sh [options] bundle.tar user@host
#     -p, --port N              ssh port (default 22)
#     --prefix DIR              install prefix on the board (default ~/taskedge)
#     -i, --identity KEY        ssh private key
#     --python PY               python on the board that creates the venv (default python3)
#     --no-deps                 pip install the runtime wheel only (board has onnxruntime/numpy/psutil)
#     --system-site-packages    the venv sees --python's packages (e.g. NVIDIA's onnxruntime-gpu)
#     -o OPTION                 extra ssh/scp option, e.g. -o UserKnownHostsFile=FILE (repeatable)
#     --json                    print the doctor's report as JSON on stdout
#     --task-pack               ARCHIVE is a task pack (taskedge task export): copy it and run
#                               `taskedge task add` into PREFIX/store (exit 2: the board lacks its base)
#
# Steps: ssh mkdir PREFIX/incoming -> scp the tar -> ssh: run the tar's install.sh (safe unpack +
# sha256 check, venv, pip install) -> taskedge doctor --profile PREFIX/release/profile.toml.
# Progress goes to stderr; stdout carries only the doctor's output. Exit status: the doctor's
# (0 ok, 1 a check failed), 2 bad usage, 3 copy/install failed, 255 ssh could not connect.
set -euo pipefail

usage() { sed -n '2,20p' "$0" >&2; exit 2; }
PORT=22 PREFIX="~/taskedge" IDENTITY="" PY="python3" JSON=0 TASKPACK=0
INSTALL_OPTS=() SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=accept-new)
POS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -p|--port) PORT="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    -i|--identity) IDENTITY="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-deps|--system-site-packages) INSTALL_OPTS+=("$1"); shift ;;
    -o) SSH_OPTS+=(-o "$2"); shift 2 ;;
    --json) JSON=1; shift ;;
    --task-pack) TASKPACK=1; shift ;;
    -h|--help) usage ;;
    -*) echo "flash.sh: unknown option $1" >&2; usage ;;
    *) POS+=("$1"); shift ;;
  esac
done
[ "${#POS[@]}" -eq 2 ] || { echo "flash.sh: give the archive and user@host" >&2; usage; }
TAR="${POS[0]}" TARGET="${POS[1]}"
[ -f "$TAR" ] || { echo "flash.sh: archive not found: $TAR (make it with taskedge pack)" >&2; exit 2; }
case "$PORT" in ''|*[!0-9]*) echo "flash.sh: --port must be a number, not $PORT" >&2; exit 2 ;; esac
if [ -n "$IDENTITY" ]; then
  [ -f "$IDENTITY" ] || { echo "flash.sh: identity file not found: $IDENTITY" >&2; exit 2; }
  SSH_OPTS+=(-i "$IDENTITY" -o IdentitiesOnly=yes)
fi

q() { printf '%q ' "$@"; }   # quote arguments for the remote shell
rssh() { ssh "${SSH_OPTS[@]}" -p "$PORT" "$TARGET" "$@"; }
log() { echo "flash: $*" >&2; }

# 1. resolve PREFIX on the board (~ expands there) and make the incoming folder
log "connecting to $TARGET:$PORT"
RPREFIX="$(rssh "p=$(q "$PREFIX"); case \"\$p\" in '~') p=\"\$HOME\" ;; '~/'*) p=\"\$HOME/\${p#'~/'}\" ;; esac; \
mkdir -p \"\$p/incoming\" && cd \"\$p\" && pwd -P" </dev/null)" || { rc=$?; log "ssh to $TARGET failed"; exit "$rc"; }
RTAR="$RPREFIX/incoming/$(basename "$TAR")"

# 2. copy (to a temp name, renamed when complete)
log "copying $TAR ($(wc -c <"$TAR") bytes) -> $TARGET:$RTAR"
scp -q "${SSH_OPTS[@]}" -P "$PORT" "$TAR" "$TARGET:$RTAR.part" </dev/null || { log "scp failed"; exit 3; }
rssh "mv -f $(q "$RTAR.part" "$RTAR")" </dev/null || { log "rename on the board failed"; exit 3; }

# a task pack: only the task goes in, into the store next to the tasks already there
if [ "$TASKPACK" = 1 ]; then
  ADD=(task add "$RTAR" --store "$RPREFIX/store" --replace)
  [ "$JSON" = 1 ] && ADD+=(--json)
  log "adding the task to $RPREFIX/store"
  set +e
  rssh "$(q "$RPREFIX/venv/bin/taskedge" "${ADD[@]}")" </dev/null
  rc=$?
  [ "$rc" = 127 ] && log "no runtime at $RPREFIX/venv: flash the base pack (taskedge pack BUNDLE ...) first"
  exit "$rc"
fi

# 3. install with the archive's own install.sh, 4. doctor
DOCTOR=(doctor --profile "$RPREFIX/release/profile.toml")
[ "$JSON" = 1 ] && DOCTOR+=(--json)
log "installing into $RPREFIX (python: $PY)"
set +e
rssh "bash -s -- $(q "$RTAR" "$RPREFIX" "$PY" "${#INSTALL_OPTS[@]}" ${INSTALL_OPTS[@]+"${INSTALL_OPTS[@]}"} "${DOCTOR[@]}")" <<'REMOTE'
set -eu
tar_path="$1" prefix="$2" py="$3" n="$4"; shift 4
opts=(); while [ "$n" -gt 0 ]; do opts+=("$1"); shift; n=$((n - 1)); done
tar -xOf "$tar_path" install.sh | bash -s -- --tar "$tar_path" --prefix "$prefix" --python "$py" \
  ${opts[@]+"${opts[@]}"} >&2 || exit 3
echo "flash: taskedge $*" >&2
set +e
"$prefix/venv/bin/taskedge" "$@" </dev/null
exit $?
REMOTE
rc=$?
set -e
case "$rc" in
  0) log "done: doctor found no failures" ;;
  1) log "installed, but the doctor reports failures (see the fixes above)" ;;
  3) log "install on the board failed (see the messages above)" ;;
  255) log "ssh to $TARGET failed" ;;
esac
exit "$rc"
