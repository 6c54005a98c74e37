#!/usr/bin/env bash
# Creates the Python environment (default .venv) with kubetask (editable) and its dev tools.
source "$(dirname "$0")/lib.sh"
VENV="${1:-$REPO_ROOT/.venv}"
PY="${PYTHON:-}"
if [[ -z $PY ]]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY="$c"; break
    fi
  done
fi
[[ -n $PY ]] || die "Python 3.11 is needed (apt-get install python3.11 python3.11-venv, or set PYTHON=...)"
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV" || die "could not create a venv: apt-get install python3.11-venv"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e "$REPO_ROOT[dev]"
log "Python environment ready: $VENV"
