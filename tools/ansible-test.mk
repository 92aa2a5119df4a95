# ansible-test sanity and units for the hpc.relaytree collection, on the
# newest ansible-core and on the oldest one CI keeps testing.
# Included by the top-level Makefile:  include tools/ansible-test.mk
# Each run needs only the Python package index (see tools/ansible-test.sh):
# about 3.5 min for everything from cold caches, 20-50 s once they exist.

ANSIBLE_TEST_SH := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))/ansible-test.sh
# CORE_VERSION:PYTHON_VERSION pairs (ansible-core 2.20+ needs Python 3.12+)
ANSIBLE_TEST_MATRIX ?= 2.21:3.12 2.19:3.11

.PHONY: ansible-test ansible-sanity ansible-units

# Every run goes on when one fails (all findings in one pass); the target
# fails if any did. ansible-test = sanity then units.
ansible-test ansible-sanity ansible-units:
	@rc=0; \
	for cmd in $(if $(filter ansible-test,$@),sanity units,$(patsubst ansible-%,%,$@)); do \
	    for pair in $(ANSIBLE_TEST_MATRIX); do \
	        bash $(ANSIBLE_TEST_SH) $${pair%%:*} $${pair##*:} $$cmd || rc=1; \
	    done; \
	done; exit $$rc
