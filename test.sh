#!/usr/bin/env bash
# Sets up ./.venv-test (first run only) with modelcd, every model flavor and the test tools,
# then runs the whole test suite against a real broker (Tansu), a real S3 endpoint (moto server)
# and a real Redis server, all started by fixtures. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
if [ ! -x .venv-test/bin/pytest ] || [ pyproject.toml -nt .venv-test/.installed ]; then
  "$PY" -m venv .venv-test
  .venv-test/bin/python -m pip install --quiet --upgrade pip
  .venv-test/bin/python -m pip install --quiet -e '.[all,test]'
  touch .venv-test/.installed
fi
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero exit.
exec .venv-test/bin/python -m pytest "$@"
