#!/usr/bin/env python
"""Loss benchmark only: same as `python -m fastreg.bench --ops lce [args]` (see benchmarks/README.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from fastreg.bench.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--ops", "lce", *sys.argv[1:]]))
