# `make serve` and `make test` do all set-up on a fresh machine; `make install` alone is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install serve test bench clean

install: $(STAMP)
	@bash scripts/ensure_redis.sh && bash scripts/ensure_prometheus.sh && VENV=$(VENV) bash scripts/ensure_helm.sh
	@$(PY) -m moe_serve.kernels --variants

# Reinstall only when the pins change. torch first, pinned, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The embedded default: local Ray, the tiny model (made on first run), the OpenAI API on 127.0.0.1:8000.
serve: install
	$(VENV)/bin/moe-serve up

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) bench/engine.py
	$(PY) bench/load.py --start

clean:
	rm -rf $(VENV)
