# regionspot_pl: every set-up step goes through here, so a fresh machine needs nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATASET ?=
ARGS ?=

.PHONY: install test lint demo extract bench bench-real clean-demo

install: $(STAMP)

# Re-install only when the dependency list or the pins change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# sam2 (SAM 2.1) is a source package whose setup.py would compile a CUDA extension (used only by
	# an optional mask post-processing): built without it, against the torch installed above (no
	# build isolation, so setuptools must be in the venv). See the comment in pyproject.toml.
	$(PY) -m pip install -q -c constraints.txt setuptools
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-build-isolation -c constraints.txt sam2==1.1.0
	touch $(STAMP)

# CI runs this: formatting, line length and lint first, then the suite in two worker processes
# of one thread each. Most tests wait on process start-up, files or small tensors, so one
# process keeps about one core busy; two keep both of a 2-core machine busy. An idle worker
# takes tests queued for the other (worksteal), so the long end-to-end tests do not end alone.
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal tests

lint: install
	$(PY) -m ruff format --check src tests scripts
	$(PY) -m ruff check src tests scripts

# make extract DATASET=o365 [ARGS="--device cuda --batch_size 16"]: the data preset NAME
# (./configs/data/NAME.yaml if there is one, else the one shipped in the package)
extract: install
	@test -n "$(DATASET)" || { echo "usage: make extract DATASET=<a data preset: coco, lvis_val, o365, openimages, v3det>"; exit 2; }
	$(PY) -m regionspot_pl.extract --preset $(DATASET) $(ARGS)

# make demo [ARGS="--quick"]: --quick runs the same stages at tiny sizes, in seconds, without the AP check
demo: install
	$(PY) scripts/demo.py $(ARGS)

# make bench [ARGS="--quick"]: --quick runs every stage at tiny sizes (a check, in well under a minute)
bench: install
	$(PY) scripts/bench.py $(ARGS)
	$(PY) scripts/bench_host.py $(filter --quick,$(ARGS))

# real-size SAM ViT-B + CLIP ViT-L/14 (random weights) on the GPU if there is one (docs/benchmarks.md);
# ARGS="--tiny": the same code on the tiny backbones, in seconds
bench-real: install
	$(PY) scripts/bench_real.py $(ARGS)
