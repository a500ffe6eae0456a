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
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# The main job. Until the dashboard lands: the bundled model, its scores, and a pruned plan's scores.
MS := $(VENV)/bin/moescope
run: $(STAMP)
	$(MS) info sample_data/model
	$(MS) evaluate sample_data/model --task qa --task arithmetic --task qa_choice --task code --task prose
	$(MS) prune sample_data/model --method frequency --ratio 0.5 --task qa --out runs/plan-frequency-qa.json --overwrite
	$(MS) evaluate sample_data/model --task qa --plan runs/plan-frequency-qa.json

bench: $(STAMP)
	$(PY) benchmarks/profile_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
