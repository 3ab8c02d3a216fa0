#!/usr/bin/env bash
# Sets up modelcd in ./.venv (first run only) and runs the whole system on this machine:
# embedded broker, store, ingest, serving node(s) and the stream processors. Ctrl-C stops it.
# Arguments go to `modelcd up` (e.g. ./up.sh --nodes 2).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/modelcd ] || [ pyproject.toml -nt .venv/.installed ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[all]'
  touch .venv/.installed
fi
exec .venv/bin/modelcd up "$@"
