# One command per job. Every target builds its own virtual environment from nothing.
#   make demo   set up, make a tiny random checkpoint (or use $TRAMONTANE_MODEL), stream a FIM completion
#   make test   set up with the test extras, lint, type-check, run the whole suite
#   make bench  decode/prefill against transformers; the editing trace with the cache on and off

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TINY := models/tiny

.PHONY: demo test lint typecheck pytest bench clean test-vscode

# torch is installed first and pinned: this machine has its CPU build on disk, while an
# unpinned torch would pull several GB of CUDA wheels.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# The engine's C++ decode kernels are built once here (about a minute; without a compiler the
# engine runs its pure-PyTorch kernels, and says so).
$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	-$(BIN)/python -m engine.arch.kernels
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install -q -e ".[test,dev]"
	touch $@

$(TINY)/params.json: | $(VENV)/.runtime
	$(BIN)/tramontane make-tiny $(TINY)

demo: $(VENV)/.runtime
	@if [ -z "$$TRAMONTANE_MODEL" ]; then $(MAKE) --no-print-directory $(TINY)/params.json; \
		echo "$(TINY) has random weights: the completion below is noise." \
		"Set TRAMONTANE_MODEL to a real checkpoint for real completions." >&2; fi
	$(BIN)/tramontane complete "$${TRAMONTANE_MODEL:-$(TINY)}" --stats \
		--prefix "$$(printf 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    ')" \
		--suffix "$$(printf '\n\nprint(fibonacci(10))')"
	@echo
	@echo "The command is $(BIN)/tramontane; \`. $(BIN)/activate\` puts it on PATH" \
		"(README: The command line)." >&2

lint: $(VENV)/.test
	$(BIN)/ruff check engine lsp_server tests benchmarks

typecheck: $(VENV)/.test
	$(BIN)/mypy

pytest: $(VENV)/.test
	$(BIN)/python -m pytest

# The VS Code extension (editors/vscode): strict tsc + eslint, its Node tests against the real
# server (tiny checkpoint, about a minute), the chat page's tests in headless Chromium (Debian's
# `chromium`, which .ci/run installs), and the .vsix.
test-vscode: $(VENV)/.test
	cd editors/vscode && npm ci --no-audit --no-fund && npm run check && \
		TRAMONTANE_LSP_SERVER=$(abspath $(BIN))/lsp_server \
		TRAMONTANE_CLI=$(abspath $(BIN))/tramontane npm test && npm run package

test: lint typecheck pytest test-vscode

bench: $(VENV)/.test
	$(BIN)/python benchmarks/decode.py --model-dir models/bench
	$(BIN)/python benchmarks/edit_trace.py --model-dir models/bench

clean:
	rm -rf $(VENV) $(TINY)
