"""python -m fastreg.bench: the one entry point of fastreg's benchmarks (``make bench``).

    python -m fastreg.bench                      # loss + optimizer sweeps sized for the device
    python -m fastreg.bench --ops lce --sizes 4096x1024x32000 --providers fastreg,eager,floor
    python -m fastreg.bench --ops lce --memory-only   # correctness + peak memory of the loss sweeps, no timing
    python -m fastreg.bench --ops optim --optimizers adam --sizes 100x400000 5000x1000
    python -m fastreg.bench --ops fit            # whole fits of the small models vs torch and sklearn
    python -m fastreg.bench --ops small          # small models: fused loss and training-step latency
    python -m fastreg.bench --ops lce-real       # loss workloads like training: SFT masks, bf16, peaked (issue 11)
    python -m fastreg.bench --ops lce-real --workloads peaked,fp16   # chosen ones
    python -m fastreg.bench --ops sklearn        # fastreg.sklearn vs scikit-learn, one process per fit (not in 'all')
    python -m fastreg.bench --bars               # the pass/fail targets of the performance issues
    python -m fastreg.bench --list               # providers and whether they are available here
    torchrun --standalone --nproc-per-node 2 -m fastreg.bench --distributed   # vocab-parallel loss (fastreg/bench/distributed.py)

Sizes: NxDxV for the loss (rows x hidden x vocabulary), TxE for the optimizers (T tensors of E
elements). Results are appended to <out>/lce.csv, <out>/optim.csv; plots and bars-<device>.md
go next to them.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import common as C
from . import fit, lce, optim, workloads


def _size(text: str) -> tuple:
    try:
        parts = tuple(int(p.replace("_", "")) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use NxDxV (loss) or TxE (optimizer)") from None
    if len(parts) not in (2, 3) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use NxDxV (loss) or TxE (optimizer)")
    return parts


def _csv_list(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastreg.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", choices=["lce", "optim", "small", "fit", "lce-real", "sklearn", "all"], default="all",
                   help="what to benchmark (default all; small: per-step latency of the small models; "
                        "fit: whole fits, CPU, not with --sizes; lce-real: the loss workloads of --workloads)")
    p.add_argument("--workloads", type=_csv_list, default=None,
                   help="loss workloads of --ops lce-real / the default run / --bars: " + ",".join(workloads.ALL)
                        + " (default " + ",".join(workloads.DEFAULT) + ", and fp16 unless torch's fp16 GEMM is a slow CPU fallback)")
    p.add_argument("--providers", type=_csv_list, default=None,
                   help="comma list; loss: " + ",".join(lce.ALL_NAMES) + "; optimizers: " + ",".join(optim.PROVIDERS)
                   + " ('wrong' is a self-test canary that must come out WRONG). Default: all but 'wrong'")
    p.add_argument("--sizes", type=_size, nargs="+", default=None,
                   help="explicit sizes instead of the sweeps: NxDxV for the loss, TxE for optimizers")
    p.add_argument("--sweep", type=_csv_list, default=None,
                   help="which default sweeps to run: V,N (loss), params,tensors (optimizers); default all")
    p.add_argument("--optimizers", type=_csv_list, default=list(optim.OPTIMIZERS),
                   help="comma list of " + ",".join(optim.OPTIMIZERS) + " (default all)")
    p.add_argument("--dtype", default=None, help="loss dtype (default float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--optim-dtype", default="float32", help="parameter dtype of the optimizer benchmark")
    p.add_argument("--reduction", choices=["mean", "sum"], default="mean")
    p.add_argument("--bias", action="store_true", help="give the linear layer a bias")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="timed iterations (default 5 cpu, 20 cuda, 3 quick)")
    p.add_argument("--max-time", type=float, default=None,
                   help="stop a provider's timed loop early once its samples exceed this many seconds (>= 3 "
                        "samples kept); default 10 for sweeps (2 with --quick), none for --bars")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1 cpu, 3 cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test of the whole suite")
    p.add_argument("--out", default=C.DEFAULT_OUT, help="results directory (default benchmarks/results)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory measurement")
    p.add_argument("--memory-only", action="store_true",
                   help="loss only: check correctness and measure peak memory, no timing (memory figures do not "
                        "depend on the machine's load, timings do)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    p.add_argument("--bars", action="store_true", help="run the fixed pass/fail configurations of the issues")
    p.add_argument("--strict", action="store_true", help="with --bars: exit 1 if any bar FAILs")
    p.add_argument("--list", action="store_true", help="list providers and their availability, then exit")
    p.add_argument("--distributed", action="store_true",
                   help="vocab-parallel loss vs loss_parallel / all-gathers, per rank (launch with torchrun)")
    return p


def resolve(args, parser) -> None:
    """Fill in device-dependent defaults and split --providers / --sizes between the two ops."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.memory_only:
        if args.bars or not args.memory or args.ops not in ("lce", "all"):
            parser.error("--memory-only measures the loss's memory: not with --bars, --no-memory or an --ops "
                         "other than lce")
        args.ops = "lce"
    if args.warmup is None:
        args.warmup = 1 if (args.quick or args.device == "cpu") else 3
    if args.repeats is None:
        args.repeats = 3 if args.quick else (20 if args.device == "cuda" else 5)
    if args.max_time is None and not args.bars:
        args.max_time = 2.0 if args.quick else 10.0
    unknown = [o for o in args.optimizers if o not in optim.OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {list(optim.OPTIMIZERS)}")
    if args.providers is None:
        args.lce_providers, args.optim_providers = lce.default_providers(), optim.default_providers()
    else:
        bad = [n for n in args.providers if n not in lce.ALL_NAMES and n not in optim.PROVIDERS]
        if bad:
            parser.error(f"unknown provider(s) {bad}; loss: {lce.ALL_NAMES}, optimizers: {list(optim.PROVIDERS)}")
        args.lce_providers = [n for n in args.providers if n in lce.ALL_NAMES]
        args.optim_providers = [n for n in args.providers if n in optim.PROVIDERS]
    sizes = args.sizes or []
    args.lce_sizes = [s for s in sizes if len(s) == 3]
    args.optim_sizes = [s for s in sizes if len(s) == 2]
    if args.workloads is None:
        args.workloads = workloads.default_workloads(args.device)
    bad = [w for w in args.workloads if w not in workloads.ALL]
    if bad:
        parser.error(f"unknown workload(s) {bad}; choose from {list(workloads.ALL)}")
    known_sweeps = {"V", "N", "params", "tensors"}
    if args.sweep and not set(args.sweep) <= known_sweeps:
        parser.error(f"unknown sweep(s) {sorted(set(args.sweep) - known_sweeps)}; choose from {sorted(known_sweeps)}")


def list_providers(device: str) -> None:
    cfg = lce.LCEConfig(8, 8, 8)
    print(f"loss providers on {device}:")
    for name, prov in lce.PROVIDERS.items():
        reason = prov.unavailable(cfg, device)
        print(f"  {name:8s} {'available' if not reason else 'n/a: ' + reason:45s} {prov.doc}")
    print(f"  {lce.FLOOR:8s} {'available':45s} {lce.FLOOR_DOC}")
    print(f"optimizer providers on {device}:")
    for name, prov in optim.PROVIDERS.items():
        reason = prov.unavailable(device)
        print(f"  {name:8s} {'available' if not reason else 'n/a: ' + reason:45s} {prov.doc}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.distributed:
        from . import distributed
        return distributed.main(args)
    resolve(args, parser)
    if args.list:
        list_providers(args.device)
        return 0
    os.makedirs(args.out, exist_ok=True)
    prov = C.provenance(args.device)
    print(f"fastreg bench on {prov['device_name']} | torch {prov['torch']} | fastreg {prov['fastreg_commit']} "
          f"| {prov['platform']} | {prov['date']}")
    if prov["loadavg"] and prov["loadavg"] > 0.5:
        print(f"warning: load average {prov['loadavg']} — other work is running; timings will be noisy")
    if args.bars:
        from . import bars
        ok = bars.run(args, prov, args.out, args.progress)
        return 1 if (args.strict and not ok) else 0
    if args.ops == "sklearn":
        from . import sklearn_bench
        if sklearn_bench.run(args, prov, args.out, args.progress):
            print("\nresults appended to " + os.path.join(args.out, "sklearn.csv"))
        return 0
    run_lce = args.ops in ("lce", "all") and (args.lce_sizes or not args.optim_sizes)
    run_optim = args.ops in ("optim", "all") and (args.optim_sizes or not args.lce_sizes)
    written = []
    if run_lce and args.lce_providers and lce.run(args, prov, args.out, args.progress):
        written.append(os.path.join(args.out, "lce.csv"))
    if run_optim and args.optim_providers and optim.run(args, prov, args.out, args.progress):
        written.append(os.path.join(args.out, "optim.csv"))
    if args.ops in ("small", "all") and not (args.lce_sizes or args.optim_sizes):
        from . import small
        if small.run(args, prov, args.out, args.progress):
            written.append(os.path.join(args.out, "small.csv"))
    # the workloads have fixed shapes: not with explicit --sizes; --providers picks the SFT providers
    if args.ops == "lce-real" or (args.ops == "all" and args.providers is None and not args.sizes):
        if workloads.run(args, prov, args.out, args.progress):
            written.append(os.path.join(args.out, "workloads.csv"))
    # whole fits: fixed problems and providers, so not with explicit --sizes / --providers
    run_fit = args.ops == "fit" or (args.ops == "all" and args.providers is None and not args.sizes)
    if run_fit and args.device == "cpu" and fit.run(args, prov, args.out, args.progress):
        written.append(os.path.join(args.out, "fit.csv"))
    print("\nresults appended to " + (", ".join(written) if written else "nothing (no sizes/providers selected)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
