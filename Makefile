# Two commands do all set-up on a fresh machine:  `make sweep`  and  `make test`.
# `make sweep` runs one worker process per core (--workers auto).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: on this machine kind `torch==2.13.0` resolves to a local CPU wheel;
# elsewhere the CPU index keeps pip from pulling several GB of CUDA packages.
TORCH  ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TRIALS ?= 50
# pytest processes for `make test` (pytest-xdist), each running one test file at a time so that a
# file's shared fixtures (stores, servers, a browser) are built once; TEST_JOBS=1 runs them in one.
TEST_JOBS ?= 2

.PHONY: install sweep train test chromium clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q "$(TORCH)" --index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

sweep: install
	$(BIN)/vqlog-sweep --trials $(TRIALS) --workers auto

train: install
	$(BIN)/vqlog train

test: install chromium
	$(BIN)/pytest -q -n $(TEST_JOBS) --dist loadfile --durations=15

# The browser tests (tests/test_browser.py) drive Debian's Chromium. As root with apt-get (CI), it
# is installed when missing; elsewhere those tests skip, and fail when CI is set.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "no chromium: the browser tests will skip (as root: apt-get install chromium)"; \
	  fi; }

clean:
	rm -rf $(VENV) *.egg-info
