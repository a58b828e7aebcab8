# regionspot_pl: every set-up step goes through here, so a fresh machine needs nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATASET ?=
ARGS ?=

.PHONY: install test lint demo extract bench bench-real clean-demo serve app browser gpu-wheels

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

# make gpu-wheels: the wheels a GPU machine without network access needs for the benchmarks (its
# Python 3.12 already has torch, numpy and more; scripts/gpu_wheels.sh lists what it lacks), at the
# versions constraints.txt pins, into the git-ignored .whl/ so that they travel with the working tree.
# There, in the repository root, with nothing of ours installed:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src
# Re-running fetches only what is missing. WHEELS_PYTHON=3.N: for another Python of that machine.
# Source-only packages (sam2, ...) are built here, with this venv's pip and setuptools.
WHEELS_DIR      ?= .whl
WHEELS_PYTHON   ?= 3.12
WHEELS_PACKAGES ?=
gpu-wheels: install
	PYTHON=$(PY) WHEELS_DIR=$(WHEELS_DIR) WHEELS_PYTHON_VERSION=$(WHEELS_PYTHON) \
	  WHEELS_PACKAGES="$(WHEELS_PACKAGES)" WHEELS_CONSTRAINTS=constraints.txt bash scripts/gpu_wheels.sh

# make serve / make app [ARGS="--port 8001"]: the demo's trained head on its tiny backbones, over HTTP
# (README: "Name regions over HTTP and on a web page") or on a web page (port 7860), with the demo's
# vocabulary loaded as "demo". The demo runs first when DEMO_OUT lacks its head (DEMO_ARGS="--quick":
# its small mode, a head that has not learned).
DEMO_OUT  ?= demo_out
DEMO_ARGS ?=
DEMO_HEAD := $(DEMO_OUT)/run/head.pt
DEMO_MODEL = --head $(DEMO_HEAD) --sam_type tiny --sam_checkpoint $(DEMO_OUT)/backbones/sam_tiny.pth \
             --clip_model $(DEMO_OUT)/backbones/clip_tiny --text_cache $(DEMO_OUT)/text_embeddings.h5 \
             --vocabulary '[demo=$(DEMO_OUT)/data/vocabulary.txt]'

$(DEMO_HEAD):
	$(PY) scripts/demo.py --out $(DEMO_OUT) $(DEMO_ARGS)

serve: install $(DEMO_HEAD)
	$(PY) -m regionspot_pl.serve $(DEMO_MODEL) $(ARGS)

app: install $(DEMO_HEAD)
	$(PY) -m regionspot_pl.app $(DEMO_MODEL) --port 7860 $(ARGS)

# The page's browser test (tests/serve/test_page.py) needs Playwright, pip-installed here at its pin,
# and a Chromium from the OS (Playwright's own browser download is not used). Without one on PATH,
# the OS package manager installs it when this runs as root with apt-get; otherwise this says how.
CHROMIUM   ?= $(shell command -v chromium || command -v chromium-browser)
APT        ?= apt-get
OS_INSTALL ?= $(shell [ "$$(id -u)" = 0 ] && command -v $(APT) >/dev/null && echo yes)
browser: install
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,browser]'
ifneq ($(CHROMIUM),)
	@echo "browser: Playwright with $(CHROMIUM)"
else ifeq ($(OS_INSTALL),yes)
	$(APT) install -y chromium
else
	@echo "no chromium on PATH and no root to install one: install it with the OS package manager" \
	      "(Debian/Ubuntu: sudo apt-get install chromium; Fedora: sudo dnf install chromium), then make browser" >&2
	@exit 1
endif
