# Benchmarks: `make bench` runs every scenario (about 40 minutes on 2 cores) and rewrites bench/RESULTS.md
# and bench/plots/*.png; `make bench-quick` runs a smaller version in under 5 minutes. See README "Benchmarks".
#
# The Python environment follows up.sh: ./.venv with modelcd[all,bench] (created on first use). Point
# VENV at another one that already has them (e.g. VENV=.venv-test) to skip the install. Peers (MLServer,
# KServe) get venvs of their own under bench/, created by bench/bench_serving.py on first use.
# The load generator is `hey` (Debian package); installed with apt-get when missing and running as root.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: bench bench-quick bench-report bench-deps bench-env bench-hey

bench: bench-deps
	$(PY) bench/run.py

bench-quick: bench-deps
	$(PY) bench/run.py --quick

# Re-render bench/RESULTS.md and the plots from the last run's bench/out/*.json.
bench-report: bench-env
	$(PY) bench/run.py --report-only

bench-deps: bench-env bench-hey

bench-env:
	@if ! $(PY) -c "import modelcd, matplotlib, sklearn" >/dev/null 2>&1; then \
	  echo "make: setting up $(VENV) with modelcd[all,bench]" >&2; \
	  [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	  $(PY) -m pip install --quiet --upgrade pip; \
	  $(PY) -m pip install --quiet -e '.[all,bench]'; \
	  touch $(VENV)/.installed; \
	fi

bench-hey:
	@if ! command -v hey >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing the load generator hey (apt-get)" >&2; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey >/dev/null; \
	  else \
	    echo "make: the benchmarks need the load generator hey: 'sudo apt-get install -y hey' (Debian/Ubuntu)" \
	         "or 'go install github.com/rakyll/hey@latest'" >&2; \
	    exit 2; \
	  fi; \
	fi
