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
# The console's browser tests drive Debian's chromium (Playwright's own browser download is not used).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium for the console's browser tests (apt-get)" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 ||
      echo "test.sh: could not install chromium; the browser tests will fail and say how to install it" >&2
  else
    echo "test.sh: chromium is missing, so the browser tests (-m browser) will fail: install it with" \
         "'sudo apt-get install -y chromium' (Debian/Ubuntu)" >&2
  fi
fi
# pytest exits 5 when it collected no test: that is a failure here, like any other non-zero exit.
exec .venv-test/bin/python -m pytest "$@"
