"""Child process of the CPU peak-memory measurement (see ``common.run_memory_child``).

    python -m fastreg.bench._memchild '{"op": "lce", "provider": "eager", "N": ..., ...}'

Prints one line ``FASTREG_BENCH_CHILD {json}`` with the measurement.
"""
import json
import sys

from . import common as C


def main(argv) -> int:
    spec = json.loads(argv[1])
    if spec.get("op") != "lce":
        raise SystemExit(f"unknown op in {spec}")
    from .lce import child_memory
    C.report_to_parent(child_memory(spec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
