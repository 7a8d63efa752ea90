# Two entry points (README quick start): `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

.PHONY: install demo test compare bench clean
install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/tiny
	$(BIN)/python -m srpo_jax.main --config=configs/tiny.py

SEEDS ?= 1
compare: $(STAMP)  # make compare SEEDS=3: every method on seeds 0, 1, 2 (srpo_jax/compare.py)
	rm -rf runs/tiny_compare
	$(BIN)/python -m srpo_jax.compare --config=configs/tiny.py --seeds=$(SEEDS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/sampler.py

clean:
	rm -rf $(VENV) runs
