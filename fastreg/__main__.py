"""``python -m fastreg``: how this fastreg was built and what it runs on (like torch's collect_env).

Paste its output into bug reports. ``--json`` prints the same facts as one JSON object.
"""
import argparse
import json
import sys

from ._C_loader import build_info

LABELS = [
    ("fastreg", "fastreg version"),
    ("fastreg_binary", "compiled library version"),
    ("library", "compiled library"),
    ("built_against_torch", "built against torch"),
    ("running_torch", "running torch"),
    ("cuda_kernels", "CUDA kernels compiled"),
    ("cuda_archs", "CUDA archs (real code)"),
    ("torch_cuda", "torch CUDA version"),
    ("cuda_device", "CUDA device"),
    ("cpu_code_path", "CPU code path (picked at load)"),
    ("openmp", "OpenMP"),
    ("openmp_threads", "OpenMP threads"),
    ("torch_threads", "torch intra-op threads"),
    ("python", "Python"),
    ("platform", "platform"),
]


def format_report(info: dict) -> str:
    def show(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, list):
            return ", ".join(v) if v else "none"
        return str(v) if v != "" else "none"
    width = max(len(label) for _, label in LABELS)
    lines = [f"{label:<{width}} : {show(info[key])}" for key, label in LABELS]
    if info["fastreg_binary"] != info["fastreg"]:
        lines.append("warning: the compiled library is from another fastreg version: rebuild it (`make build`)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastreg", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    args = parser.parse_args(argv)
    info = build_info()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
