"""``python -m fastreg``: how this fastreg was built and what it runs on (like torch's collect_env).

Paste its output into bug reports. ``--json`` prints the same facts as one JSON object.
``--ops`` adds a table of every operator and how the dispatcher serves it on each device.
``--require-cuda`` exits 1 unless the CUDA kernels are compiled in and every operator has a CUDA
kernel (what `make cuda-build` and `make gpu-check` check after building).
"""
import argparse
import json
import sys

from ._C_loader import build_info
from ._op_kernels import coverage_summary, kernel_coverage, missing_kernels

LABELS = [
    ("fastreg", "fastreg version"),
    ("fastreg_binary", "compiled library version"),
    ("library", "compiled library"),
    ("built_against_torch", "built against torch"),
    ("running_torch", "running torch"),
    ("cuda_kernels", "CUDA kernels compiled"),
    ("cuda_archs", "CUDA archs (real code)"),
    ("cuda_op_kernels", "ops with a CUDA kernel"),
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
    lines = [f"{label:<{width}} : {show(info[key])}" for key, label in LABELS if key in info]
    if info["fastreg_binary"] != info["fastreg"]:
        lines.append("warning: the compiled library is from another fastreg version: rebuild it (`make build`)")
    return "\n".join(lines)


def format_op_table(op_kernels: dict) -> str:
    """One line per operator: how the dispatcher serves it on the CPU and on CUDA."""
    ops = list(op_kernels["cpu"])
    width = max(len(op) for op in ops)
    lines = [f"{'operator':<{width}}   {'cpu':<10} cuda"]
    lines += [f"{op:<{width}}   {op_kernels['cpu'][op]:<10} {op_kernels['cuda'][op]}" for op in ops]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastreg", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the facts as JSON")
    parser.add_argument("--require-cuda", action="store_true",
                        help="exit 1 unless the CUDA kernels are compiled in and every operator has one")
    parser.add_argument("--ops", action="store_true", help="also list every operator's CPU and CUDA kernels")
    args = parser.parse_args(argv)
    info = build_info()
    info["cuda_op_kernels"] = coverage_summary("cuda") if info["cuda_kernels"] else "none (built without CUDA)"
    if args.ops:
        info["op_kernels"] = {dev: kernel_coverage(dev) for dev in ("cpu", "cuda")}
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    if args.ops and not args.json:
        print(format_op_table(info["op_kernels"]))
    if args.require_cuda:
        if not info["cuda_kernels"]:
            print("error: this fastreg was built without its CUDA kernels", file=sys.stderr)
            return 1
        missing = missing_kernels("cuda")
        if missing:
            print(f"error: no CUDA kernel registered for {', '.join(missing)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
