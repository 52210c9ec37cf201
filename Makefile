# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Serialise builds: several shells (or helpers) may build in this tree at once.
LOCK = flock /tmp/gig_fast_build.lock

.PHONY: setup deps install build build-cpu demo test test-fast bench-cpu clean

deps:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# Fashion-MNIST (the demo's data set) ships in Debian; nothing is downloaded at run time.
	[ -d /usr/share/datasets/fashion-mnist ] || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(PIP) install -q -r requirements-dev.txt

# A non-editable install, so packaging mistakes fail here and in CI.
install: deps
	$(PIP) install --no-build-isolation --no-deps .

setup: install

# In-tree builds for development (editable work in this checkout).
build:
	$(LOCK) $(PYTHON) setup.py build_ext --inplace

build-cpu:
	$(LOCK) env GIG_FAST_SKIP_CUDA=1 $(PYTHON) setup.py build_ext --inplace

demo: setup
	gig-fast demo --out gig_demo

test: setup
	cd tests && $(PYTHON) -m pytest -q -p no:cacheprovider .

bench-cpu: build
	$(PYTHON) benchmarks/run.py --device cpu

clean:
	rm -rf build dist *.egg-info gig_fast/*.so
