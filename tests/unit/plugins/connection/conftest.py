"""The relay connection's options, registered with Ansible's configuration as the plugin loader would."""

from __future__ import annotations

import pytest
import yaml
from ansible import constants as C

from ansible_collections.hpc.relaytree.plugins.connection import relay
from ansible_collections.hpc.relaytree.plugins.doc_fragments.tree import ModuleDocFragment

NAME = "hpc.relaytree.relay"
FRAGMENTS = ["hpc.relaytree.tree.options", "hpc.relaytree.tree.connection"]


@pytest.fixture(scope="session", autouse=True)
def relay_options() -> dict:
    """The connection's options as Ansible sees them: its own, merged with those of its doc fragments."""
    doc = yaml.safe_load(relay.DOCUMENTATION)
    assert doc["extends_documentation_fragment"] == FRAGMENTS
    options = doc["options"]
    for fragment in FRAGMENTS:
        var = fragment.rsplit(".", 1)[1].upper()
        for name, fields in yaml.safe_load(getattr(ModuleDocFragment, var))["options"].items():
            options.setdefault(name, {}).update(fields)
    C.config.initialize_plugin_configuration_definitions("connection", NAME, options)
    return options
