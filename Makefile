# Everything a fresh machine needs: `make test` and `make run` create .venv themselves.
# torch is installed first, pinned, so pip takes the CPU build on this disk instead of a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moescope-installed

.PHONY: setup test run bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q torch==2.13.0 -e '.[dev,lm-eval]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job: the dashboard on the bundled sample model, at http://127.0.0.1:8501 (this machine only,
# whatever folder it is started from). Another model: make run MODEL=path/or/hub-id
MODEL ?=
run: $(STAMP)
	$(VENV)/bin/moescope dashboard $(MODEL)

bench: $(STAMP)
	$(PY) benchmarks/profile_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
