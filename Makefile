# Two commands do all set-up on a fresh machine:  `make sweep`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch: on this machine kind `torch==2.13.0` resolves to a local CPU wheel;
# elsewhere the CPU index keeps pip from pulling several GB of CUDA packages.
TORCH  ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TRIALS ?= 50

.PHONY: install sweep train test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" || $(BIN)/pip install -q "$(TORCH)" --index-url $(TORCH_CPU_INDEX)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

sweep: install
	$(BIN)/vqlog-sweep --trials $(TRIALS)

train: install
	$(BIN)/vqlog train

test: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) *.egg-info
