"""python -m fastreg.bench --distributed: the vocab-parallel loss against the other ways of
computing a cross-entropy over an LM head split across a process group. Launch with torchrun:

    torchrun --standalone --nproc-per-node 2 -m fastreg.bench --distributed                # N=2048 D=512 V=50257
    torchrun --standalone --nproc-per-node 2 -m fastreg.bench --distributed --sizes 512x256x10007 --repeats 3

gloo on CPU, NCCL with --device cuda. Every rank holds rows [start_r, start_r + V_r) of the weight
(torch.chunk's uneven split, as Shard(0)); input and target are the same on every rank. One step is
forward + backward (loss, dX, this rank's dW). Providers:

  fastreg        fastreg.distributed.linear_cross_entropy on a Shard(0) DTensor weight
  loss_parallel  torch: DTensor logits x @ W^T (sharded over the vocabulary), F.cross_entropy under
                 torch.distributed.tensor.parallel.loss_parallel() — materialises N x V_r logits and
                 their gradient
  gather_weight  all-gather the weight, then the single-process fastreg op on the full weight
  gather_logits  local logits, all-gathered to N x V, eager cross-entropy, this rank's slice back

Reported per rank: median time of a step, peak extra memory of a step (CPU: process RSS
high-water mark above the level before the step, read with fastreg's cache of freed CPU buffers
emptied and glibc mmapping every block >= 64 KiB as in the other fastreg benchmarks, so buffers
kept from an earlier step are neither in that level nor reused unseen; CUDA: max_memory_allocated
above it), and bytes
communicated per step, counted from the collectives the step issues (a dispatch mode sees every
c10d / functional collective) with the ring-algorithm volume each rank sends: all-reduce of M
bytes 2 (w-1)/w M, all-gather to M bytes (w-1)/w M, reduce-scatter of M bytes (w-1)/w M. The
"loss statistics" column leaves out the all-reduce of the input gradient, which every provider
that keeps the weight sharded needs (it is the linear layer's, not the loss's).
Correctness is checked before timing against the single-process op on the full weight.
"""
from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from . import common as C

DEFAULT_SIZE = (2048, 512, 50257)
PROVIDERS = ("fastreg", "loss_parallel", "gather_weight", "gather_logits")

_ALL_REDUCE = {"allreduce_", "all_reduce", "all_reduce_", "all_reduce_coalesced"}
_ALL_GATHER = {"allgather_", "all_gather_into_tensor", "_allgather_base_", "all_gather_into_tensor_coalesced",
               "allgather_into_tensor_coalesced_"}
_REDUCE_SCATTER = {"reduce_scatter_", "reduce_scatter_tensor", "_reduce_scatter_base_"}


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


class CommCounter(TorchDispatchMode):
    """Counts the bytes this rank sends in collectives (ring model, see the module docstring)."""

    def __init__(self, world: int):
        super().__init__()
        self.world = world
        self.by_kind = {"all_reduce": 0.0, "all_gather": 0.0, "reduce_scatter": 0.0}
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into its collectives first; they come back here
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        ns = func.namespace
        name = func.overloadpacket.__name__
        if ns in ("c10d", "_c10d_functional", "_c10d_functional_autograd"):
            w = self.world
            if name in _ALL_REDUCE:
                self.by_kind["all_reduce"] += 2 * (w - 1) / w * _bytes(args[0])
                self.calls += 1
            elif name in _ALL_GATHER:  # output = world x input; each rank sends its input w-1 times
                self.by_kind["all_gather"] += (w - 1) * _bytes(args[0] if ns != "c10d" else args[1])
                self.calls += 1
            elif name in _REDUCE_SCATTER:
                self.by_kind["reduce_scatter"] += (w - 1) / w * _bytes(args[0] if ns != "c10d" else args[1])
                self.calls += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())


def _shard_rows(V: int, world: int, rank: int) -> tuple[int, int]:
    per = -(-V // world)
    start = min(rank * per, V)
    return start, max(0, min(per, V - start))


def _make_providers(x, w_full, target, mesh, rank, world):
    """Each provider: a function running one forward + backward and returning (loss, dX, dW_r)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    import fastreg
    from fastreg.distributed import linear_cross_entropy as vp_lce

    V = w_full.shape[0]
    start, v_r = _shard_rows(V, world, rank)
    w_dt = distribute_tensor(w_full, mesh, [Shard(0)])
    w_local = w_dt.to_local()
    group = mesh.get_group(0)

    def fastreg_vp():
        xs = x.detach().requires_grad_()
        ws = w_dt.detach().requires_grad_()
        loss = vp_lce(xs, ws, target)
        loss.backward()
        return loss.to_local(), xs.grad, ws.grad.to_local()

    def torch_loss_parallel():
        xs = x.detach().requires_grad_()
        ws = w_dt.detach().requires_grad_()
        x_dt = DTensor.from_local(xs, mesh, [Replicate()], run_check=False)
        t_dt = DTensor.from_local(target, mesh, [Replicate()], run_check=False)
        with loss_parallel():
            logits = torch.matmul(x_dt, ws.t())  # Shard(1): (N, V_r) per rank
            loss = F.cross_entropy(logits, t_dt)
            loss.backward()
        return loss.to_local(), xs.grad, ws.grad.to_local()

    def gather_weight():
        xs = x.detach().requires_grad_()
        per = -(-V // world)
        full = torch.empty((world * per, w_full.shape[1]), dtype=w_local.dtype, device=w_local.device)
        padded = torch.zeros((per, w_full.shape[1]), dtype=w_local.dtype, device=w_local.device)
        padded[:v_r] = w_local
        dist.all_gather_into_tensor(full, padded, group=group)
        wf = full[:V].requires_grad_()
        loss = fastreg.linear_cross_entropy(xs, wf, target)
        loss.backward()  # the data are replicated: every rank has the whole dW, keeps its rows
        return loss, xs.grad, wf.grad[start:start + v_r]

    def gather_logits():
        xs = x.detach().requires_grad_()
        ws = w_local.detach().requires_grad_()
        per = -(-V // world)
        local = xs @ ws.t()
        padded = F.pad(local, (0, per - v_r))
        full = torch.empty((world * x.shape[0], per), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(full, padded.detach().contiguous(), group=group)
        logits = full.view(world, x.shape[0], per).permute(1, 0, 2).reshape(x.shape[0], world * per)[:, :V].requires_grad_()
        loss = F.cross_entropy(logits, target)
        loss.backward()
        local.backward(logits.grad[:, start:start + v_r])
        dist.all_reduce(xs.grad, group=group)
        return loss, xs.grad, ws.grad

    return {"fastreg": fastreg_vp, "loss_parallel": torch_loss_parallel, "gather_weight": gather_weight,
            "gather_logits": gather_logits}, (start, v_r)


def _peak_extra(step, device: str) -> int:
    if device == "cuda":
        return C.cuda_peak_extra_bytes(step, lambda: None)
    return C.rss_peak_extra_of(step)["peak_extra_bytes"]


def _mmap_large_blocks() -> None:
    """The CPU memory method of fastreg.bench (common.CPU_MEMORY_METHOD): glibc mmaps every block
    >= 64 KiB, so a freed buffer leaves the RSS and the high-water mark counts live bytes, not heap
    fragmentation. The ordinary bench sets MALLOC_MMAP_THRESHOLD_ for its child; torchrun started
    this process, so set the same through mallopt (fixed thresholds also stop glibc's adaptation)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: RSS figures are then allocator-dependent
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 65536)
    libc.mallopt(M_TRIM_THRESHOLD, 65536)


def main(args) -> int:
    device = args.device
    if device == "cpu":
        _mmap_large_blocks()
    backend = "nccl" if device == "cuda" else "gloo"
    if "RANK" not in os.environ:
        raise SystemExit("--distributed runs under torchrun: torchrun --standalone --nproc-per-node 2 -m fastreg.bench "
                         "--distributed")
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device, (world,))
    sizes = [s for s in (args.sizes or []) if len(s) == 3] or [DEFAULT_SIZE]
    dtype = C.parse_dtype(args.dtype) if args.dtype else torch.float32
    providers = [p for p in (args.providers or PROVIDERS) if p in PROVIDERS]
    repeats = args.repeats or (2 if device == "cpu" else 20)
    results = []
    for (N, D, V) in sizes:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(N, D, generator=g) * 0.5).to(device=device, dtype=dtype)
        w_full = (torch.randn(V, D, generator=g) * 0.05).to(device=device, dtype=dtype)
        target = torch.randint(0, V, (N,), generator=g).to(device)
        fns, (start, v_r) = _make_providers(x, w_full, target, mesh, rank, world)

        # correctness first: each provider against the single-process op on the full weight
        import fastreg

        xr, wr = x.detach().requires_grad_(), w_full.detach().requires_grad_()
        ref_loss = fastreg.linear_cross_entropy(xr, wr, target)
        ref_loss.backward()
        ref = (ref_loss.detach(), xr.grad, wr.grad[start:start + v_r])
        single_mem = _peak_extra(lambda: _single_step(x, w_full, target), device)
        errors = {}
        for name in providers:
            out = fns[name]()
            errors[name] = max(C.rel_err(o.detach().float(), r.float()) for o, r in zip(out, ref))
            del out
        del xr, wr, ref
        # bytes per step (one counted step), then memory, then interleaved timing
        comm = {}
        for name in providers:
            counter = CommCounter(world)
            with counter:
                fns[name]()
            comm[name] = counter
        mem = {name: _peak_extra(fns[name], device) for name in providers}
        samples = {name: [] for name in providers}
        for _ in range(repeats):
            for name in providers:
                dist.barrier()
                C.synchronize(device)
                t0 = time.perf_counter()
                fns[name]()
                C.synchronize(device)
                samples[name].append((time.perf_counter() - t0) * 1e3)
        for name in providers:
            dx_bytes = 2 * (world - 1) / world * N * D * x.element_size() if name != "gather_weight" else 0
            results.append(dict(rank=rank, N=N, D=D, V=V, V_local=v_r, provider=name,
                                ms=statistics.median(samples[name]), peak_extra=mem[name], single_peak=single_mem,
                                comm=comm[name].total, comm_loss=comm[name].total - dx_bytes,
                                collectives=comm[name].calls, rel_err=errors[name]))
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        _report(everyone, world, args, dtype)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def _single_step(x, w_full, target):
    import fastreg

    xr, wr = x.detach().requires_grad_(), w_full.detach().requires_grad_()
    fastreg.linear_cross_entropy(xr, wr, target).backward()
    return xr.grad, wr.grad


def _report(everyone, world, args, dtype):
    prov = C.provenance(args.device)
    print(f"fastreg vocab-parallel bench | {world} ranks ({'nccl' if args.device == 'cuda' else 'gloo'}) | "
          f"{prov['device_name']} | torch {prov['torch']} | fastreg {prov['fastreg_commit']} | {C.dtype_name(dtype)}"
          + (f" | load average {prov['loadavg']} (timings noisy)" if prov.get("loadavg") else ""))
    rows = [r for per_rank in everyone for r in per_rank]
    cols = [("rank", "rank", "d"), ("N", "N", "d"), ("D", "D", "d"), ("V", "V", "d"), ("V_local", "V_r", "d"),
            ("provider", "provider", "s"), ("ms", "ms/step", ".4g"), ("peak_extra", "peak extra", "bytes"),
            ("comm", "sent/step", "bytes"), ("comm_loss", "sent (loss)", "bytes"), ("collectives", "colls", "d"),
            ("rel_err", "max rel err", ".2g")]
    header = " | ".join(f"{h:>12s}" for _, h, _ in cols)
    print(header)
    for r in rows:
        cells = []
        for key, _, spec in cols:
            v = r[key]
            cells.append(f"{C.human_bytes(v):>12s}" if spec == "bytes" else f"{format(v, spec):>12s}")
        print(" | ".join(cells))
    print("\nratios per rank (fastreg vs the others; bars of issue 10):")
    for rank in range(world):
        mine = {r["provider"]: r for r in rows if r["rank"] == rank}
        f = mine.get("fastreg")
        if not f:
            continue
        parts = [f"rank {rank}: peak extra / single-process op {f['peak_extra'] / max(f['single_peak'], 1):.2f} "
                 f"(bar <= 0.5)"]
        if "loss_parallel" in mine:
            lp = mine["loss_parallel"]
            parts.append(f"peak extra / loss_parallel {f['peak_extra'] / max(lp['peak_extra'], 1):.2f} (bar < 1)")
            parts.append(f"loss comm / loss_parallel's {f['comm_loss'] / max(lp['comm_loss'], 1):.2f} (bar <= 2)")
            parts.append(f"time / loss_parallel {f['ms'] / lp['ms']:.2f}")
        for other in ("gather_weight", "gather_logits"):
            if other in mine:
                parts.append(f"loss comm / {other} {100 * f['comm_loss'] / max(mine[other]['comm'], 1):.3f} % "
                             f"(bar < 1 %), total comm incl. dX {100 * f['comm'] / max(mine[other]['comm'], 1):.2f} %")
        print("  " + "; ".join(parts))
