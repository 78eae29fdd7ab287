# The README's quick start: `make run` (set up + score the sample with the default model) and
# `make test` (set up + run the test suite, offline). Both create .venv from this repository's files.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# torch 2.13.0: on these machines pip finds a local CPU wheel; elsewhere add
# --index-url https://download.pytorch.org/whl/cpu to avoid the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[tf,hub]'
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[tf,hub,test,serving,grpc,kserve,onnx,onnx-export,torch,ray]'
	$(BIN)/pip install -q --no-deps 'tensorflow-serving-api==2.21.0'
	# AntiBERTy (MIT): a real pretrained BERT masked LM shipped inside this wheel (later versions download
	# their weights instead). --no-deps: the tests read its files; its runner's pins are not wanted here.
	$(BIN)/pip install -q --no-deps 'antiberty==0.1.3'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/mlm-score data/sample.tsv -o probs.parquet --id-column id

# The whole suite: system packages for the report test (chromium; skipped without root), the peers'
# venv (.venv-peers: minicons for the RoBERTa comparison and AntiBERTy's own runner need transformers < 5;
# MLM_REQUIRE_PEERS=1 makes their tests fail rather than skip without it), the main suite, then the
# Airflow DAG test in its own venv (.venv-airflow; Airflow's pins stay out of .venv). The Triton venv
# (.venv-triton: PyTriton's real tritonserver, which pins numpy<2) serves the Triton tests;
# MLM_REQUIRE_TRITON=1 makes them fail rather than skip without it.
test: $(VENV)/.test-deps
	bash scripts/ci_system_deps.sh
	PYTHON=$(BIN)/python bash scripts/peers_env.sh
	PYTHON=$(BIN)/python bash scripts/triton_env.sh
	MLM_REQUIRE_PEERS=1 MLM_REQUIRE_TRITON=1 $(BIN)/python -m pytest -q -m "not airflow"
	bash scripts/airflow_test.sh

bench: $(VENV)/.test-deps
	$(BIN)/python scripts/bench_e2e.py

clean:
	rm -rf $(VENV) .venv-airflow .venv-peers .venv-triton probs.parquet probs.sentences.parquet
