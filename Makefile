# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Serialise builds: several shells may build in this tree at once.
LOCK = flock /tmp/gig_fast_build.lock

.PHONY: setup deps-run deps install install-demo build build-cpu demo demo-vit test test-fast bench bench-smoke bench-save bench-compare mutation mutation-changed clean

# What the demo needs: torch, Fashion-MNIST, the runtime and build requirements.
deps-run:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	# Fashion-MNIST (the demo's data set) ships in Debian; nothing is downloaded at run time.
	[ -d /usr/share/datasets/fashion-mnist ] || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }
	$(PIP) install -q -r requirements.txt

# ... plus the test and benchmark tools and the optional extras the tests cover.
deps: deps-run
	$(PIP) install -q -r requirements-dev.txt
	# the browser tests of report.html drive Debian's chromium headless with the system chromedriver
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

# A non-editable install, so packaging mistakes fail here and in CI.
install: deps
	$(PIP) install --no-build-isolation --no-deps .

setup: install

# The demo runs on the CPU where no GPU is visible: there, skip the CUDA extension's ~10-minute
# compile (the tests' install still builds it, so CI proves it compiles).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
install-demo: deps-run
	$(if $(HAS_GPU),,GIG_FAST_SKIP_CUDA=1) $(PIP) install --no-build-isolation --no-deps .

# In-tree builds for development (editable work in this checkout).
build:
	$(LOCK) $(PYTHON) setup.py build_ext --inplace

build-cpu:
	$(LOCK) env GIG_FAST_SKIP_CUDA=1 $(PYTHON) setup.py build_ext --inplace

demo: install-demo
	gig-fast demo --out gig_demo

# the same on the demo vision transformer (README: "Vision transformers and timm models")
demo-vit: install-demo
	gig-fast demo --arch vit --out gig_demo_vit

test: setup
	cd tests && $(PYTHON) -m pytest -q -p no:cacheprovider .

# The benchmark suite (pytest-benchmark; README: Benchmarks). It imports the checkout when it holds a
# build (make build / build-cpu), else the installed package. BENCH_SIZE: smoke | quick | full (default:
# quick on a CPU, full on a GPU).
BENCH_SIZE ?=
BENCH_FAIL ?= min:10%
BENCH_ARGS = --benchmark-only $(if $(BENCH_SIZE),--gig-size $(BENCH_SIZE),)

# the suite, its rows appended to benchmarks/results.jsonl and RESULTS.md re-rendered
bench:
	$(PYTHON) benchmarks/run.py $(if $(BENCH_SIZE),--gig-size $(BENCH_SIZE),)

# CI: every benchmark once at the smallest size, each route checked against its reference, nothing timed
bench-smoke:
	$(PYTHON) -m pytest benchmarks -q --gig-size smoke

# a reference run of this machine kind under benchmarks/saved/<kind>/ (NAME names it)
bench-save:
	$(PYTHON) -m pytest benchmarks $(BENCH_ARGS) --benchmark-save=$(or $(NAME),reference)

# fails when a case is slower than the last saved run of this machine kind by more than BENCH_FAIL
bench-compare:
	$(PYTHON) -m pytest benchmarks $(BENCH_ARGS) --benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL)

# Mutation check (tools/mutation_check.py, docs/mutation.md). `make mutation`: every mutant, after checking
# that the unmutated tree passes each test selection (about 40 min on a loaded 2-core CPU). `make mutation-changed` (CI): the
# mutants of the files a change touches since MUTATION_BASE, none started after MUTATION_BUDGET seconds.
MUTATION_BASE ?= HEAD~1
MUTATION_BUDGET ?= 240

mutation:
	$(PYTHON) tools/mutation_check.py --baseline --markdown docs/mutation.md

mutation-changed:
	$(PYTHON) tools/mutation_check.py --changed-since $(MUTATION_BASE) --time-budget $(MUTATION_BUDGET)

clean:
	rm -rf build dist *.egg-info gig_fast/*.so
