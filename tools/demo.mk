# `make demo`: simulated 16-node cluster, collection built and installed, deploy.yml over SSH,
# the example playbooks with the folded callback, relaytree CLI, teardown (see tools/demo.sh).
# Included by the top-level Makefile (include tools/demo.mk), whose `setup` target builds .venv.
DEMO_SH := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))/demo.sh

.PHONY: demo
demo: setup
	VENV=$(VENV) bash $(DEMO_SH)
