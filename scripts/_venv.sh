# Sourced by scripts/demo.sh and scripts/test.sh: create or reuse .venv and install atlasfit into it.
# Usage: . scripts/_venv.sh EXTRAS   (e.g. "plot" or "test,docs")
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
pick_python() {
  for py in "${ATLASFIT_PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "atlasfit needs Python >= 3.11 (set ATLASFIT_PYTHON=/path/to/python3.11)" >&2
  return 1
}
VENV="${ATLASFIT_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  echo "atlasfit: creating virtual environment $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.atlasfit-installed-$1"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "atlasfit: installing atlasfit[$1] into $VENV"
  python -m pip install -q -e ".[$1]"
  touch "$stamp"
fi
