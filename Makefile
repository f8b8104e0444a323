# Quick start (fresh machine):   make demo   # the main job on CPU
#                                make test   # the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TINY ?= artifacts/tiny

.PHONY: install demo test lint clean

$(VENV)/.slime-rl-installed: pyproject.toml setup.py scripts/install-cpu.sh
	VENV=$(VENV) bash scripts/install-cpu.sh

install: $(VENV)/.slime-rl-installed

# Until the RL loop lands, the main job builds the offline tiny model and evaluates it.
demo: install
	$(VENV)/bin/slime-rl make-tiny-model $(TINY)

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf artifacts runs .pytest_cache
