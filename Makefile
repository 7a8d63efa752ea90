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

# A second environment with JAX's CUDA plugin and libtpu, for compiling GPU and TPU programs without the device
# (srpo_jax.plan, the deviceless tests tests/test_plan.py runs through tests/aot_worker.py). Kept apart: in .venv the
# CUDA plugin would make JAX look for a GPU, and the CPU demo and tests must run on the CPU build.
AOT_VENV := .venv-aot
AOT_STAMP := $(AOT_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

$(AOT_STAMP): pyproject.toml
	test -x $(AOT_VENV)/bin/python || $(PY) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/pip install -q --upgrade pip
	$(AOT_VENV)/bin/pip install -q -e '.[gpu,tpu]'
	rm -f $(AOT_VENV)/.installed-* && touch $@

# A third environment: a real SGLang server on the CPU, for tests/test_sglang_real.py. Every package is pinned in
# tests/sglang_cpu/requirements.txt and installed without dependency resolution (sglang's own list asks for CUDA-only
# wheels); SGLang's CUDA-only imports are stubbed in tests/sglang_cpu/stubs. Rebuilt from scratch when the list changes,
# so it holds exactly that list.
SGL_VENV := .venv-sglang
SGL_REQS := tests/sglang_cpu/requirements.txt
SGL_STAMP := $(SGL_VENV)/.installed-$(shell cat $(SGL_REQS) | cksum | cut -d' ' -f1)

$(SGL_STAMP): $(SGL_REQS)
	rm -rf $(SGL_VENV) && $(PY) -m venv $(SGL_VENV)
	$(SGL_VENV)/bin/pip install -q --upgrade pip
	$(SGL_VENV)/bin/pip install -q --no-deps -r $(SGL_REQS)
	touch $@

.PHONY: install aot-env plan demo test compare bench clean sglang-env
install: $(STAMP)
aot-env: $(AOT_STAMP)
sglang-env: $(SGL_STAMP)

# make plan CONFIG=configs/qwen3_8b.py TARGET=h100x8 (or v5p-8, v6e-8, ...): will the run fit? (srpo_jax/plan.py;
# deviceless compile)
CONFIG ?= configs/qwen3_8b.py
TARGET ?= h100x8
PLAN_ARGS ?=
plan: $(AOT_STAMP)
	$(AOT_VENV)/bin/python -m srpo_jax.plan --config=$(CONFIG) --target=$(TARGET) $(PLAN_ARGS)

# DEMO_RUN_DIR and DEMO_ARGS (extra --config.* flags) let tests/test_readme_commands.py run this very target, short.
DEMO_RUN_DIR ?= runs/tiny
DEMO_ARGS ?=
demo: $(STAMP)
	rm -rf $(DEMO_RUN_DIR)
	$(BIN)/python -m srpo_jax.main --config=configs/tiny.py --config.run_dir=$(DEMO_RUN_DIR) $(DEMO_ARGS)

SEEDS ?= 1
compare: $(STAMP)  # make compare SEEDS=3: every method on seeds 0, 1, 2 (srpo_jax/compare.py)
	rm -rf runs/tiny_compare
	$(BIN)/python -m srpo_jax.compare --config=configs/tiny.py --seeds=$(SEEDS)

# One worker per core, a test file per worker (module fixtures run once); the suite is compile-bound on CPU.
# The multi-process trainer and README-command tests run alone afterwards: their two processes and gloo collectives
# would compete with the other worker for this machine's cores (BUILD_NOTES.md, "Test suite after issue 12").
SOLO_TESTS := tests/test_multiprocess_trainer.py tests/test_readme_commands.py
# Both passes share one fresh XLA compilation cache (the solo tests reuse the tiny config's programs), removed after.
test: $(STAMP) $(AOT_STAMP) $(SGL_STAMP)
	export JAX_COMPILATION_CACHE_DIR="$$(mktemp -d -t srpo-jax-test-xla-cache-XXXXXX)"; \
	trap 'rm -rf "$$JAX_COMPILATION_CACHE_DIR"' EXIT; \
	$(BIN)/python -m pytest -n auto --dist loadfile tests $(addprefix --ignore=,$(SOLO_TESTS)) && \
	$(BIN)/python -m pytest $(SOLO_TESTS)

bench: $(STAMP)  # each prints a table of ratios measured side by side in one run (bench/*.py docstrings)
	$(BIN)/python bench/step.py
	$(BIN)/python bench/loss_memory.py
	$(BIN)/python bench/sampler.py
	$(BIN)/python bench/refit.py

clean:
	rm -rf $(VENV) $(AOT_VENV) $(SGL_VENV) runs
