# fusemux developer targets. Every target installs what it needs first (see scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
DEMO_DIR ?= /var/tmp/fusemux-demo

.PHONY: help setup demo test test-unit test-nfs lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml scripts/setup.sh
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
	bash scripts/nfs-sandbox.sh $(VENV)/bin/pytest -p no:cacheprovider tests/nfs

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check fusemux tests
	$(VENV)/bin/ruff format --check fusemux tests
	$(VENV)/bin/mypy

bench: setup ## benchmarks (not part of the test run)
	@if ls tests/bench/test_*.py >/dev/null 2>&1; then \
		$(VENV)/bin/python -m pytest -p no:cacheprovider tests/bench -s; \
	else echo "no benchmarks yet (tests/bench/README.md)"; fi

clean: ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache
