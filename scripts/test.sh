#!/usr/bin/env bash
# Run the test suite (includes building the docs and executing the notebooks).
# Extra arguments go to pytest (e.g. -m slow, -k parity).
. "$(dirname "$0")/_venv.sh" test,docs
exec python -m pytest "$@"
