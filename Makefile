# edgegen: every target creates .venv if needed and installs what it needs, so a fresh clone just works.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# CPU build of torch (pinned in pyproject), CPU ONNX Runtime, TensorRT-RTX (builds engines without a GPU),
# ModelOpt for FP8, PySide6, test tools. GPU sites install from the offline bundle instead (installer/).
EXTRAS := cpu,rtx,fp8,ui,server,cluster,test
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The trained demo model ships in assets/; without it, a tiny RANDOM Klein model (it draws noise) stands in.
DEMO_MODEL  := $(if $(wildcard assets/demo-model/model_index.json),assets/demo-model,out/tiny-random-klein)
DEMO_BUNDLE := engines/demo
DEMO_PROMPT := a red circle on a blue background

.PHONY: install test demo app bundle clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Two workers (the CI machine's cores); tests of one file stay on one worker, and the tiny models' exports are
# shared between workers (tests/conftest.py: shared), so each is exported once per run; a component that several
# bundles share (FP32 parts of an FP8 bundle, a config variant's unchanged text encoder) is traced to ONNX once
# (export/cache.py, which tests/conftest.py turns on per run) and still checked in every export.
test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

out/tiny-random-klein/model_index.json: | $(STAMP)
	@echo "assets/demo-model is missing: using a tiny RANDOM Klein-architecture model, which draws noise"
	$(BIN)/python -m export.synthetic klein out/tiny-random-klein

$(DEMO_BUNDLE)/manifest.json: $(STAMP) $(DEMO_MODEL)/model_index.json $(shell find $(DEMO_MODEL) -type f 2>/dev/null)
	$(BIN)/edgegen export --model $(DEMO_MODEL) --out $(DEMO_BUNDLE) --overwrite

demo: $(DEMO_BUNDLE)/manifest.json
	@mkdir -p out
	$(BIN)/edgegen generate --bundle $(DEMO_BUNDLE) --prompt "$(DEMO_PROMPT)" --seed 7 --out out/demo.png

app: $(DEMO_BUNDLE)/manifest.json
	$(BIN)/edgegen app --bundle $(DEMO_BUNDLE)

# The offline installer archive ships the assets (demo model, references) and the exported demo bundle, so
# `edgegen selftest` works on the air-gapped machine straight after install.
bundle: $(DEMO_BUNDLE)/manifest.json
	$(BIN)/python -m installer.build_bundle --out dist --bundle $(DEMO_BUNDLE)

clean:
	rm -rf $(VENV) out dist build
