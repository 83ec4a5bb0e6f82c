"""Loss workloads that look like real training (issue 11), beside the dense fp32 sweeps of ``lce``.

    python -m fastreg.bench --ops lce-real                      # sft, bf16, peaked (+ fp16, see below; part of `make bench`)
    python -m fastreg.bench --ops lce-real --workloads peaked   # one of them

- ``sft``: instruction tuning. N = 8 sequences x 512 tokens, the first half of every sequence
  (the prompt) ignored, fp32, D=1024, V=32000; every loss provider side by side, plus fastreg on
  the same shape with nothing ignored and the floor of the active rows alone.
- ``bf16`` / ``fp16``: 2048x1024x32000 in that dtype: fastreg, eager and the three GEMMs of the
  floor in that dtype (exactly the fp32 floor's definition: three ``torch.mm`` into preallocated
  outputs of the input dtype; oneDNN accumulates each GEMM in fp32 internally and rounds its
  output once, no separate fp32 accumulation of dW), errors against fp64 side by side; ``bf16``
  also measures fp32 at the same shape. ``fp16`` is in the default set except on an x86 CPU
  without AVX512-FP16/AMX-FP16: torch 2.13's fp16 GEMM there runs at ~1-25 GFLOP/s (measured on
  an AMD EPYC VM: one 256x32000 @ 32000x1024 product 37 s), so at 2048 rows eager and the floor
  would take ~10 min per step; asked for there, fp16 runs at ``N_fp16_slow_gemm`` = 256 rows
  (fastreg computes such fp16 calls in fp32, see ``fastreg.linear_cross_entropy``). With the
  instructions (Sapphire Rapids) fp16 GEMMs run at ~1/3 of bf16's speed, ~fp32's.
- ``peaked``: a "trained-LM-like" input, bf16, 2048x1024x32000: Zipf(1.1) targets (class id =
  frequency rank, as in a BPE vocabulary) and hidden states aligned with their target's weight
  row, ``h = alpha * W[t] / |W[t]| + noise`` with noise of logit-scale std ``PEAKED_NOISE``;
  alpha is calibrated so the mean softmax entropy is 2 nats, and the entropy of the generated
  bf16 input is measured in fp64 and printed. fastreg with ``grad_filter_eps`` None / "auto" / a
  float, eager bf16 as the error reference.

Every case is checked against its fp64 reference before it is timed (``lce.check``); the timed
cases of one workload run interleaved (round robin, median of ``--repeats``), so their ratios
come from the same machine state. Rows go to ``<out>/workloads.csv`` with provenance; the bar
lines of issue 11 are printed, and written to ``bars-<device>.md`` by ``--bars``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import common as C
from . import lce
from .lce import FLOOR, IGNORE_INDEX, LCEConfig

ALL = ("sft", "bf16", "peaked", "fp16")
DEFAULT = ("sft", "bf16", "peaked")  # + fp16 where its GEMMs are fast (default_workloads)

PEAKED_ENTROPY = 2.0  # nats, the target mean softmax entropy
PEAKED_NOISE = 1.0  # std of the noise part of the logits (hidden-state noise times |W_c| ~ 1)
PEAKED_PRIOR = 1.0  # strength of the shared unigram (log-Zipf) component of every row's logits
FILTER_BLOCK = 256  # rows x classes of a block in the printed skippable-block fraction
ZIPF_S = 1.1
ENTROPY_SAMPLE = 512  # rows of the entropy calibration / measurement
PROMPT_FRACTION = 0.5  # SFT: leading part of every sequence that is ignored


@dataclass(frozen=True)
class Shapes:
    """The sizes of the workloads: the issue's (full) or tiny ones for --quick and the tests."""
    seqs: int = 8
    seq_len: int = 512
    D: int = 1024
    V: int = 32000
    N_dtype: int = 2048
    N_fp16_slow_gemm: int = 256  # fp16 rows where torch's fp16 GEMM is a slow fallback (see above)

    @classmethod
    def quick(cls) -> "Shapes":
        return cls(seqs=4, seq_len=32, D=32, V=2048, N_dtype=128, N_fp16_slow_gemm=64)

    def rows(self, dtype: torch.dtype, device: str) -> int:
        if dtype == torch.float16 and device == "cpu" and slow_fp16_gemm():
            return min(self.N_dtype, self.N_fp16_slow_gemm)
        return self.N_dtype


def default_workloads(device: str) -> list:
    """The workloads of a plain run: fp16 too, unless torch's fp16 GEMM is a slow fallback here."""
    return list(DEFAULT) + ([] if device == "cpu" and slow_fp16_gemm() else ["fp16"])


def slow_fp16_gemm() -> bool:
    """An x86 CPU without AVX512-FP16/AMX-FP16: torch's fp16 GEMM is a scalar fallback there."""
    caps = torch._C._cpu._get_cpu_capability()
    return caps.get("architecture") == "x86_64" and not (caps.get("avx512_fp16") or caps.get("amx_fp16"))


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def sft_mask_(t: torch.Tensor, seqs: int, seq_len: int, prompt_fraction: float = PROMPT_FRACTION) -> torch.Tensor:
    """Set the first ``prompt_fraction`` of each of ``seqs`` sequences of ``t`` to IGNORE_INDEX (in place)."""
    prompt = int(round(seq_len * prompt_fraction))
    t.view(seqs, seq_len)[:, :prompt] = IGNORE_INDEX
    return t


def zipf_targets(n: int, V: int, s: float, g: torch.Generator) -> torch.Tensor:
    """n class ids with P(c) proportional to (c + 1)^-s (class id = frequency rank)."""
    p = torch.arange(1, V + 1, dtype=torch.float64).pow(-s)
    return torch.multinomial(p / p.sum(), n, replacement=True, generator=g)


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean softmax entropy (nats) of the rows of ``logits``, computed in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def calibrate_alpha(aligned: torch.Tensor, noise: torch.Tensor, target: float, iters: int = 40) -> float:
    """The alpha for which mean_entropy(alpha * aligned + noise) = target (bisection; the entropy
    falls as alpha grows and the target logit pulls away from the rest)."""
    lo, hi = 0.0, 1.0
    while mean_entropy(hi * aligned + noise) > target:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"cannot reach a mean entropy of {target} nats")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_entropy(mid * aligned + noise) > target else (lo, mid)
    return 0.5 * (lo + hi)


@dataclass
class Peaked:
    inputs: lce.Inputs
    alpha: float
    entropy: float  # measured mean softmax entropy of the generated (dtype-rounded) input
    p_target: float  # measured mean probability of the target class
    distinct_targets: int
    skippable: float  # fraction of FILTER_BLOCK x FILTER_BLOCK gradient blocks all <= 2^-12 (bf16 'auto')


def peaked_inputs(cfg: LCEConfig, device: str, seed: int = 0, entropy: float = PEAKED_ENTROPY,
                  noise: float = PEAKED_NOISE, s: float = ZIPF_S, sample: int = ENTROPY_SAMPLE,
                  prior: float = PEAKED_PRIOR) -> Peaked:
    """The trained-LM-like input: Zipf targets, hidden states aligned with their target's weight row,
    plus the unigram prior a trained LM carries: a shared direction e with W_c . e proportional to
    log P(c) (centred), and every hidden state has a component along e, so every row's logits
    contain prior * log P(c) and the probability mass off the target sits on frequent classes."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = torch.randn(cfg.V, cfg.D, generator=g) / math.sqrt(cfg.D)
    t = zipf_targets(cfg.N, cfg.V, s, g)
    e = torch.randn(cfg.D, generator=g)
    e /= e.norm()
    log_p = -s * torch.arange(1, cfg.V + 1, dtype=torch.float32).log()
    scale = 10.0  # W_c . e = log_p_c / scale keeps |W_c| ~ 1; h . e = prior * scale restores it
    W += ((log_p - log_p.mean()) / scale)[:, None] * e
    u = W[t] / W[t].norm(dim=1, keepdim=True)
    eta = noise * torch.randn(cfg.N, cfg.D, generator=g)  # W_c . eta ~ N(0, noise^2 |W_c|^2), |W_c| ~ 1
    eta += prior * scale * e
    k = min(sample, cfg.N)
    Wd = W.double()
    alpha = calibrate_alpha(u[:k].double() @ Wd.T, eta[:k].double() @ Wd.T, entropy)
    x = (alpha * u + eta).to(cfg.dtype)
    W = W.to(cfg.dtype)
    logits = x[:k].double() @ W.double().T  # what the benchmark actually feeds in, after rounding
    logp = torch.log_softmax(logits, -1)
    measured = float(-(logp.exp() * logp).sum(-1).mean())
    p_target = float(logp.gather(1, t[:k, None]).exp().mean())
    grad = logp.exp() - torch.nn.functional.one_hot(t[:k], cfg.V).double()  # each row's own d loss / d z
    skippable = float(_block_max(grad.abs()).le(2.0 ** -12).double().mean())
    inp = lce.Inputs(x.to(device).requires_grad_(), W.to(device).requires_grad_(), t.to(device), None)
    return Peaked(inp, alpha, measured, p_target, int(t.unique().numel()), skippable)


def _block_max(a: torch.Tensor, block: int = FILTER_BLOCK) -> torch.Tensor:
    """Max of each (block x block) tile of a 2-D tensor (edge tiles smaller)."""
    rows, cols = -(-a.shape[0] // block) * block, -(-a.shape[1] // block) * block
    padded = torch.nn.functional.pad(a, (0, cols - a.shape[1], 0, rows - a.shape[0]))
    return padded.view(rows // block, block, cols // block, block).amax(dim=(1, 3))


# ----------------------------------------------------------------------------------------------
# cases and their measurement
# ----------------------------------------------------------------------------------------------
def _fastreg_with(**opts) -> Callable:
    def build(cfg, device):
        import fastreg
        f = fastreg.linear_cross_entropy
        return lambda x, W, t, b: f(x, W, t, linear_bias=b, reduction=cfg.reduction, ignore_index=IGNORE_INDEX,
                                    **opts)
    return build


def _fastreg_option_missing(option: str) -> Callable:
    def missing(cfg, device):
        reason = lce._fastreg_missing(cfg, device)
        if reason:
            return reason
        import fastreg
        if option not in inspect.signature(fastreg.linear_cross_entropy).parameters:
            return f"this fastreg has no {option}= option"
        return None
    return missing


def filter_provider(eps) -> lce.Provider:
    name = "fastreg-filter-" + (eps if isinstance(eps, str) else f"{eps:.3g}")
    return lce.Provider(name, f"fastreg.linear_cross_entropy(..., grad_filter_eps={eps!r})",
                        _fastreg_with(grad_filter_eps=eps), _fastreg_option_missing("grad_filter_eps"))


@dataclass
class Case:
    """One provider on one input: ``group`` names the input (its rows share floor / eager ratios)."""
    group: str
    provider: lce.Provider
    cfg: LCEConfig
    inputs: Optional[lce.Inputs] = None  # None for the floor
    ref: Optional[dict] = None
    extra: dict = field(default_factory=dict)


def floor_provider(label: str = FLOOR) -> lce.Provider:
    return lce.Provider(label, lce.FLOOR_DOC, lambda cfg, device: None)


def measure(cases: list, workload: str, device: str, warmup: int, repeats: int,
            max_time: Optional[float] = None, tick: Callable[[], None] = lambda: None) -> list:
    """Check every case against its reference, then time the good ones interleaved -> result rows."""
    rows, steps = [], {}
    gate_of = {}  # id(inputs) -> the correctness gates of that input (eager's own errors, once per input)
    for i, case in enumerate(cases):
        cfg = case.cfg
        row = {**cfg.spec(), "device": device, "flops": cfg.flops, "workload": workload, "group": case.group,
               "provider": case.provider.name, **case.extra}
        rows.append(row)
        try:
            if case.inputs is None:
                row["status"] = C.REFERENCE
                steps[i] = lce.floor_step(cfg, device)
                continue
            reason = case.provider.unavailable(cfg, device)
            if reason:
                row.update(status=C.UNAVAILABLE, note=reason)
                continue
            fn = case.provider.build(cfg, device)
            seen = []  # the loss of the checked training-style call (forward with autograd, then backward)

            def recorded(*a, fn=fn):
                seen.append(fn(*a))
                return seen[-1]
            if id(case.inputs) not in gate_of:
                gate_of[id(case.inputs)] = lce.gates(case.inputs, case.ref, cfg)
            row.update(lce.check(recorded, case.inputs, case.ref, cfg, gate_of[id(case.inputs)]))
            row["loss"] = float(seen[-1].detach())  # exact: every input dtype widens to float64 exactly
            del seen
            if row["status"] == C.OK:
                steps[i] = lce.make_step(fn, case.inputs)
        except Exception as e:  # a crash is a result too
            row.update(status=C.ERROR, note=C.describe_exception(e))
        finally:
            if case.inputs is not None:
                case.inputs.zero_grad()
            tick()
    try:
        timings = C.time_interleaved(steps, device, warmup, repeats, max_time)
    except Exception as e:
        for i in steps:
            rows[i].update(status=C.ERROR, note="timing: " + C.describe_exception(e))
        timings = {}
    for i, t in timings.items():
        cfg = cases[i].cfg
        rows[i].update(median_ms=t.median, min_ms=t.min, max_ms=t.max, spread=t.spread, repeats=len(t.samples),
                       tflops=cfg.flops / (t.median * 1e-3) / 1e12)
    for case in cases:
        if case.inputs is not None:
            case.inputs.zero_grad()
    C.free_memory(device)
    for group in dict.fromkeys(r["group"] for r in rows):
        lce.add_ratios([r for r in rows if r["group"] == group])
    return rows


def _group_rows(rows, group):
    return {r["provider"]: r for r in rows if r["group"] == group}


# ----------------------------------------------------------------------------------------------
# the workloads: cases, then the bar lines of issue 11 on their rows
# ----------------------------------------------------------------------------------------------
def sft_cases(shapes: Shapes, device: str, providers: list) -> list:
    N = shapes.seqs * shapes.seq_len
    cfg = LCEConfig(N, shapes.D, shapes.V, torch.float32, "mean")
    masked = lce.make_inputs(cfg, device)
    sft_mask_(masked.t, shapes.seqs, shapes.seq_len)
    active = int((masked.t != IGNORE_INDEX).sum())
    frac = 1 - active / N
    dense = lce.make_inputs(cfg, device)
    ref_masked, ref_dense = lce.reference(masked, cfg, device), lce.reference(dense, cfg, device)
    extra = {"ignored_fraction": frac}
    group = f"masked {frac:.0%}"
    cases = [Case(group, lce.PROVIDERS[n], cfg, masked, ref_masked, extra) for n in providers if n != FLOOR]
    cases += [Case(group, floor_provider(), cfg, extra=extra),
              Case(group, floor_provider("floor-active"), LCEConfig(active, shapes.D, shapes.V), extra=extra),
              Case("unmasked", lce.PROVIDERS["fastreg"], cfg, dense, ref_dense, {"ignored_fraction": 0.0})]
    return cases


def sft_bars(crit, rows: list) -> None:
    masked_group = next(r["group"] for r in rows if r["group"].startswith("masked"))
    by = _group_rows(rows, masked_group)
    f, eager = by.get("fastreg", {}), by.get("eager", {})
    dense = _group_rows(rows, "unmasked").get("fastreg", {})
    r0 = next(iter(by.values()))
    bar = f"SFT fp32 N={r0['N']} D={r0['D']} V={r0['V']}, {masked_group} ignored"
    why = f.get("note") or dense.get("note") or ""
    crit.add(bar, "fastreg agrees with float64 reference", 1.0 if f.get("status") == C.OK else None, ">=", 1,
             note=why)
    crit.add(bar, "fastreg masked / fastreg unmasked time", C.ratio(f.get("median_ms"), dense.get("median_ms")),
             "<=", 0.6, note=why)
    crit.add(bar, "speedup vs eager (masked)", C.ratio(eager.get("median_ms"), f.get("median_ms")), ">=", 1.8,
             note=why)


def dtype_cases(shapes: Shapes, device: str, dtypes: list) -> list:
    cases = []
    for dtype in dtypes:
        cfg = LCEConfig(shapes.rows(dtype, device), shapes.D, shapes.V, dtype, "mean")
        inp = lce.make_inputs(cfg, device)
        ref = lce.reference(inp, cfg, device)
        group = C.dtype_name(dtype)
        cases += [Case(group, lce.PROVIDERS["fastreg"], cfg, inp, ref), Case(group, lce.PROVIDERS["eager"], cfg, inp, ref),
                  Case(group, floor_provider(), cfg)]
    return cases


def dtype_bars(crit, rows: list) -> None:
    for group in dict.fromkeys(r["group"] for r in rows):
        by = _group_rows(rows, group)
        f, eager, floor = by["fastreg"], by["eager"], by[FLOOR]
        bar = f"loss {group} mean N={f['N']} D={f['D']} V={f['V']}"
        crit.add(bar, "fastreg agrees with float64 reference", 1.0 if f.get("status") == C.OK else None, ">=", 1,
                 note=f.get("note") or "")
        if group == "float32":
            crit.add(bar, "time / 3-matmul floor", C.ratio(f.get("median_ms"), floor.get("median_ms")), "<=", 1.08)
            continue
        crit.add(bar, f"time / 3 {group} GEMMs floor", C.ratio(f.get("median_ms"), floor.get("median_ms")), "<=", 1.10)
        crit.add(bar, "speedup vs eager", C.ratio(eager.get("median_ms"), f.get("median_ms")), ">=", 1.15)
        for key, what in (("err_loss", "loss"), ("err_dx", "dX"), ("err_dw", "dW")):
            crit.add(bar, f"{what} error vs fp64 / eager's", C.ratio(f.get(key), eager.get(key)), "<=", 2.0)


FILTER_EPS_FLOAT = 2.0 ** -8
"""The float tolerance of the peaked workload, beside "auto" (bf16: 2^-10). grad_filter_eps is the
relative tolerance of what filtering leaves out (docs/gradient-filtering.md): 2^-8 is bf16's unit
roundoff, the loosest setting still of the order of eager's own error."""


def peaked_cases(shapes: Shapes, device: str) -> tuple:
    cfg = LCEConfig(shapes.N_dtype, shapes.D, shapes.V, torch.bfloat16, "mean")
    pk = peaked_inputs(cfg, device)
    ref = lce.reference(pk.inputs, cfg, device)
    extra = {"entropy": pk.entropy, "p_target": pk.p_target}
    eps = FILTER_EPS_FLOAT
    cases = [Case("peaked", lce.PROVIDERS["fastreg"], cfg, pk.inputs, ref, {**extra, "grad_filter_eps": "None"}),
             Case("peaked", filter_provider("auto"), cfg, pk.inputs, ref, {**extra, "grad_filter_eps": "auto"}),
             Case("peaked", filter_provider(eps), cfg, pk.inputs, ref, {**extra, "grad_filter_eps": eps}),
             Case("peaked", lce.PROVIDERS["eager"], cfg, pk.inputs, ref, extra),
             Case("peaked", floor_provider(), cfg, extra=extra)]
    return cases, pk


def peaked_bars(crit, rows: list) -> None:
    by = _group_rows(rows, "peaked")
    off, auto, eager = by["fastreg"], by[filter_provider("auto").name], by["eager"]
    bar = (f"peaked bf16 N={off['N']} D={off['D']} V={off['V']}, entropy {off.get('entropy', math.nan):.2f} nats, "
           "grad_filter_eps='auto'")
    why = auto.get("note", "")  # e.g. a fastreg without grad_filter_eps: the bars are not met (FAIL)
    crit.add(bar, "filtered agrees with float64 reference", 1.0 if auto.get("status") == C.OK else None, ">=", 1,
             note=why)
    crit.add(bar, "speedup of filtering (off / auto)", C.ratio(off.get("median_ms"), auto.get("median_ms")), ">=", 1.3,
             note=why)
    same = None if auto.get("loss") is None or off.get("loss") is None else float(auto["loss"] == off["loss"])
    crit.add(bar, "loss identical to unfiltered (1 = yes)", same, ">=", 1, note=why)
    for key, what in (("err_dx", "dX"), ("err_dw", "dW")):
        crit.add(bar, f"{what} error vs fp64 / eager bf16's", C.ratio(auto.get(key), eager.get(key)), "<=", 2.0,
                 note=why)


# ----------------------------------------------------------------------------------------------
# driver: run the chosen workloads, print, CSV
# ----------------------------------------------------------------------------------------------
CSV_COLUMNS = lce.CSV_COLUMNS[:10] + ["workload", "group"] + lce.CSV_COLUMNS[11:] + [
    "loss", "ignored_fraction", "entropy", "p_target", "grad_filter_eps"]

TABLE_COLUMNS = [
    ("input", "group"),
    ("size", lambda r: f"{r['N']}x{r['D']}x{r['V']} {C.dtype_name(C.parse_dtype(r['dtype']))}"),
    ("provider", "provider"),
    ("status", "status"),
    ("median ms", lambda r: C.fmt(r.get("median_ms"), ".1f")),
    ("spread", lambda r: C.fmt(r["spread"] * 100, ".0f") + "%" if r.get("spread") is not None else "-"),
    ("x floor", lambda r: C.fmt(r.get("x_floor"), ".2f")),
    ("vs eager", lambda r: C.fmt(r.get("speedup_vs_eager"), ".2f") + "x" if r.get("speedup_vs_eager") else "-"),
    ("err loss", lambda r: C.fmt(r.get("err_loss"), ".1e")),
    ("err dX", lambda r: C.fmt(r.get("err_dx"), ".1e")),
    ("err dW", lambda r: C.fmt(r.get("err_dw"), ".1e")),
    ("note", lambda r: (r.get("note") or "")[:60]),
]


def run_workloads(names: list, device: str, shapes: Shapes, warmup: int, repeats: int, max_time, crit,
                  lce_providers: Optional[list] = None, show_progress: bool = True,
                  done: Callable[[str, list], None] = lambda workload, rows: None) -> tuple:
    """Run the named workloads -> (rows, lines describing the inputs); bar lines go into ``crit``;
    ``done(workload, rows)`` after each one (so a long run leaves its finished parts behind)."""
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(ALL)}")
    rows, notes = [], []
    sft_providers = [n for n in (lce_providers or lce.default_providers()) if n in lce.PROVIDERS and n != "wrong"]
    plan = []
    if "sft" in names:
        plan.append(("sft", lambda: sft_cases(shapes, device, sft_providers), sft_bars))
    dtypes = [d for n, d in (("bf16", torch.bfloat16), ("fp16", torch.float16)) if n in names]
    if dtypes:
        if "bf16" in names:
            dtypes.append(torch.float32)
        plan.append(("dtype", lambda: dtype_cases(shapes, device, dtypes), dtype_bars))
    if "peaked" in names:
        def peaked():
            cases, pk = peaked_cases(shapes, device)
            notes.append(f"peaked input: Zipf(s={ZIPF_S}) targets ({pk.distinct_targets} distinct of V={shapes.V}), "
                         f"h = {pk.alpha:.3f} * W[t]/|W[t]| + noise (logit std {PEAKED_NOISE}) + unigram prior "
                         f"(strength {PEAKED_PRIOR}); measured in fp64 on "
                         f"{min(ENTROPY_SAMPLE, shapes.N_dtype)} rows of the bf16 input: mean softmax entropy "
                         f"{pk.entropy:.3f} nats (target {PEAKED_ENTROPY}), mean p(target) {pk.p_target:.3f}, "
                         f"{pk.skippable:.1%} of its {FILTER_BLOCK}x{FILTER_BLOCK} logit-gradient blocks all <= 2^-12; "
                         f"grad_filter_eps 'auto' = finfo(bf16).eps/8 = 2^-10, the float one 2^-8")
            return cases
        plan.append(("peaked", peaked, peaked_bars))
    for workload, make, bars in plan:
        cases = make()
        progress = C.Progress(len(cases), f"workload {workload}", show_progress)
        wrows = measure(cases, workload, device, warmup, repeats, max_time, progress.tick)
        progress.close()
        bars(crit, wrows)
        rows += wrows
        done(workload, wrows)
        del cases
        C.free_memory(device)
    return rows, notes


def run(args, prov: dict, out_dir: str, show_progress: bool = True) -> list:
    """``--ops lce-real`` (and part of the default run): the workloads, CSV, table, bar lines."""
    from .bars import Criteria, CRIT_COLUMNS
    crit = Criteria()
    shapes = Shapes.quick() if args.quick else Shapes()

    def done(workload, rows):
        for r in rows:
            r.update(prov)
        C.append_csv(f"{out_dir}/workloads.csv", rows, CSV_COLUMNS)
        print(f"\n== loss workload {workload} (issue 11), forward+backward, {prov['device_name']} ==")
        print(C.render_table(rows, TABLE_COLUMNS), flush=True)

    rows, notes = run_workloads(args.workloads, args.device, shapes, args.warmup, args.repeats, args.max_time, crit,
                                args.lce_providers, show_progress, done)
    for n in notes:
        print(n)
    print("\nbar lines (issue 11):")
    print(C.render_table(crit.rows, CRIT_COLUMNS))
    return rows
