# Two commands on a fresh machine:  `make demo`  and  `make test`.
# TORCH pins the wheel that lies on the project machines' disk; override it elsewhere if you like,
# e.g. `make demo TORCH=torch` (any torch >= 2.1 works).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# made training 13x slower (135 vs 1815 images/s for LeNet-5, measured side by side).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: demo test install clean

$(BIN)/dyninfer: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

install: $(BIN)/dyninfer

demo: $(BIN)/dyninfer
	$(BIN)/dyninfer demo --out runs/demo

# The tests also cover ONNX export, so `make test` (the command CI runs) installs the [onnx] extra
# and requires it: the ONNX test runs instead of skipping.
$(VENV)/.onnx: $(BIN)/dyninfer
	$(BIN)/pip install -q -e ".[onnx]"
	@touch $@

test: $(BIN)/dyninfer $(VENV)/.onnx
	DYNINFER_REQUIRE_ONNX=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs build src/*.egg-info
