# Quick start (fresh machine):   make demo   # the main job on CPU
#                                make test   # the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
TINY ?= artifacts/tiny

.PHONY: install demo test test-slow lint clean

$(VENV)/.slime-rl-installed: pyproject.toml setup.py scripts/install-cpu.sh
	VENV=$(VENV) bash scripts/install-cpu.sh

install: $(VENV)/.slime-rl-installed

# The main job: build the offline tiny model (reused when its build record matches), then a
# 5-minute asynchronous GRPO run on it that prints eval accuracy as it climbs.
# Extra overrides: make demo DEMO_ARGS="run.num_steps=100 rollout.temperature=0.7"
DEMO_ARGS ?=
demo: install
	$(VENV)/bin/slime-rl make-tiny-model $(TINY) --reuse
	$(VENV)/bin/slime-rl train configs/examples/arith_tiny.yaml \
	    model.path=$(TINY) data.train_path=$(TINY)/data/train.jsonl data.eval_path=$(TINY)/data/eval.jsonl $(DEMO_ARGS)

# The suite without the long multi-node, fault and resume runs (marked slow); CI runs both.
test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf artifacts runs .pytest_cache
