# fusemux developer targets. Every target installs what it needs first (see scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEMO_DIR ?= /var/tmp/fusemux-demo
BENCH_STAMP := $(VENV)/.bench-done
# Where `make bench` writes its JSON, markdown table and chart; BENCH_ARGS go to the harness
# (see `python -m tests.bench.run --help`).
BENCH_OUT ?= docs/bench
BENCH_ARGS ?=

.PHONY: help setup demo test test-unit test-nfs test-libvirt lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup.sh scripts/apt-install.sh
	bash scripts/setup.sh

setup: $(STAMP) ## install apt packages, create .venv and install fusemux into it

demo: setup ## build the demo area (two loop-mounted ext4 exports) and serve it
	$(VENV)/bin/fusemux demo --dir $(DEMO_DIR)

test: setup ## run the whole test suite (all three tiers; needs root)
	$(VENV)/bin/pytest

test-unit: setup ## run tiers (a) and (b) only
	$(VENV)/bin/pytest tests/unit tests/api

test-nfs: setup ## the NFS tier: fusemux in a qemu guest with kernel NFS, vs nfs-ganesha
	bash scripts/setup-nfs.sh
	unshare --mount --propagation private $(PY) -m tests.nfs.image
	FUSEMUX_NFS_ENGINE=pyfuse3 bash scripts/nfs-sandbox.sh $(VENV)/bin/pytest -p no:cacheprovider tests/nfs
	FUSEMUX_NFS_ENGINE=passthrough bash scripts/nfs-sandbox.sh $(VENV)/bin/pytest -p no:cacheprovider tests/nfs

test-libvirt: setup ## the libvirt tier: real libvirtd/virtlockd and TCG qemu on fusemux volumes
	bash scripts/setup-libvirt.sh
	$(VENV)/bin/pytest -p no:cacheprovider tests/libvirt

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check fusemux tests
	$(VENV)/bin/ruff format --check fusemux tests
	$(VENV)/bin/mypy

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $@

bench: $(BENCH_STAMP) ## benchmarks vs native, mergerfs, bare pyfuse3 (not part of the test run; root)
	$(PY) -m tests.bench.run --json $(BENCH_OUT)/results.json --table $(BENCH_OUT)/results.md \
		--chart $(BENCH_OUT)/ratios.png $(BENCH_ARGS)

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache
