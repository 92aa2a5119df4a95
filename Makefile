# relaytree — every entry point installs what it needs itself.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
# ansible-core 2.20+ needs Python 3.12: prefer it where pyenv (or the system) has it.
PYTHON ?= $(shell for p in /root/.pyenv/versions/3.12*/bin/python3 python3.12 python3; do command -v $$p >/dev/null 2>&1 && { echo $$p; break; }; done)
STAMP := $(VENV)/.installed
# EL9 nodes run the daemon on Python 3.9: its code is also tested there.
PYTHON39 ?= $(firstword $(wildcard /root/.pyenv/versions/3.9*/bin/python3) $(shell command -v python3.9))
VENV39 := $(ROOT)/.venv39
PYTEST := -m pytest -q -p no:cacheprovider

.PHONY: setup proto lint test test-engine test-py39 test-integration bench clean

include tools/ansible-test.mk
include tools/demo.mk

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	@{ test -x /usr/sbin/sshd && command -v ssh && command -v ip && command -v tc && command -v unshare; } >/dev/null 2>&1 || \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client iproute2 util-linux >/dev/null; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e . -r requirements-dev.txt
	touch $@

# Regenerate the committed protobuf stubs (tests fail when they are stale).
proto: setup
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src proto/relaytree/v1/relaytree.proto

# Every test; each part runs even when an earlier one failed, and the target fails if any did.
test: setup
	@rc=0; \
	$(MAKE) --no-print-directory lint || rc=1; \
	$(MAKE) --no-print-directory test-engine || rc=1; \
	$(MAKE) --no-print-directory test-py39 || rc=1; \
	$(MAKE) --no-print-directory ansible-test || rc=1; \
	$(MAKE) --no-print-directory test-integration || rc=1; \
	exit $$rc

# ansible-test lints the collection's plugins; this covers the package, tools and tests
# (pyflakes-level checks, for the Python 3.9 the daemon must run on).
lint: setup
	$(VENV)/bin/ruff check --select E9,F --target-version py39 --exclude src/relaytree/v1 src tools bench tests roles

test-engine: setup
	$(VENV)/bin/python $(PYTEST) tests/engine

test-py39: setup
	@if [ -z "$(PYTHON39)" ]; then echo "no Python 3.9 here: daemon not tested on 3.9"; exit 0; fi; \
	test -x $(VENV39)/bin/python || $(PYTHON39) -m venv $(VENV39); \
	$(VENV39)/bin/pip install -q -e . pytest pytest-asyncio hypothesis psutil && \
	$(VENV39)/bin/python $(PYTEST) tests/engine/test_execute.py tests/engine/test_filecopy.py \
	    tests/engine/test_auth.py tests/engine/test_keys.py tests/engine/test_jobs.py \
	    tests/engine/test_tree.py tests/engine/test_filefetch.py tests/engine/test_fetch.py \
	    -k "not memory and not 1gib"

test-integration: setup
	$(VENV)/bin/python $(PYTEST) tests/integration

bench: setup
	$(VENV)/bin/python bench/engine.py

clean:
	rm -rf $(VENV) $(VENV39) build dist *.egg-info src/*.egg-info
