"""``python -m relaytree.coordinator``: run the coordinator process (see ``server``)."""

from __future__ import annotations

import sys

from relaytree.coordinator.server import main

if __name__ == "__main__":
    sys.exit(main())
