"""Make the working tree importable as ansible_collections.hpc.relaytree for a plain pytest run.

ansible-test units runs from an ansible_collections/hpc/relaytree tree already; then this does nothing.
"""

from __future__ import annotations

import atexit
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path


def _collection_importable() -> bool:
    try:
        return importlib.util.find_spec("ansible_collections.hpc.relaytree") is not None
    except ImportError:
        return False


if not _collection_importable():
    _TMP = Path(tempfile.mkdtemp(prefix="relaytree-units-"))
    (_TMP / "ansible_collections" / "hpc").mkdir(parents=True)
    (_TMP / "ansible_collections" / "hpc" / "relaytree").symlink_to(Path(__file__).resolve().parents[2])
    sys.path.insert(0, str(_TMP))
    atexit.register(shutil.rmtree, str(_TMP), True)  # removes the symlink, never follows it
