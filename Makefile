# relaytree — every entry point installs what it needs itself.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
# ansible-core 2.20+ needs Python 3.12: prefer it where pyenv (or the system) has it.
PYTHON ?= $(shell for p in /root/.pyenv/versions/3.12*/bin/python3 python3.12 python3; do command -v $$p >/dev/null 2>&1 && { echo $$p; break; }; done)
STAMP := $(VENV)/.installed

.PHONY: setup proto test test-engine bench demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	@command -v sshd >/dev/null 2>&1 || test -x /usr/sbin/sshd || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client iproute2 >/dev/null; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e . -r requirements-dev.txt
	touch $@

# Regenerate the committed protobuf stubs (tests fail when they are stale).
proto: setup
	$(VENV)/bin/python -m grpc_tools.protoc -Iproto --python_out=src --pyi_out=src proto/relaytree/v1/relaytree.proto

test: setup
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/engine

bench: setup
	$(VENV)/bin/python bench/engine.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
