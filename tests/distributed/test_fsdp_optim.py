"""FSDP2 (fully_shard) + fastreg's fused optimizers and loss, DDP, DCP checkpoints, ShardedGradScaler."""
from __future__ import annotations

import copy

import pytest
import torch

from .launch import run_distributed

pytestmark = pytest.mark.distributed

N, D, H, V = 24, 10, 14, 37  # odd sizes: uneven FSDP shards
STEPS = 20
ADAMW = dict(lr=3e-2, betas=(0.9, 0.99), weight_decay=0.05)


class TinyLM(torch.nn.Module):
    """Two linears and a bias-free LM head whose loss is fastreg's fused loss, inside forward."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(D, H)
        self.mid = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x, target):
        import fastreg

        h = torch.tanh(self.mid(torch.tanh(self.body(x))))
        return fastreg.linear_cross_entropy(h, self.head.weight, target, label_smoothing=0.1)


def _data(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(N, D, generator=g, dtype=torch.float64), torch.randint(0, V, (N,), generator=g)


def _model():
    torch.manual_seed(0)
    return TinyLM().double()


def _reference(steps: int, opt_cls=torch.optim.AdamW):
    """One process, the whole batch, torch.optim.AdamW: the trajectory every test compares to."""
    model = _model()
    opt = opt_cls(model.parameters(), **ADAMW)
    for s in range(steps):
        x, t = _data(s)
        opt.zero_grad()
        model(x, t).backward()
        opt.step()
    return model


def _shard(model, world):
    from torch.distributed.fsdp import fully_shard

    # The head is not wrapped on its own: its weight is used in the root's forward (not through
    # head.forward), so the root's unshard is what hands the loss the full, plain weight.
    for m in (model.body, model.mid):
        fully_shard(m)
    fully_shard(model)
    return model


def _train(model, opt, rank, world, steps, first=0):
    for s in range(first, first + steps):
        x, t = _data(s)
        rows = slice(rank * N // world, (rank + 1) * N // world)  # equal halves: mean of means = mean
        opt.zero_grad()
        model(x[rows], t[rows]).backward()
        opt.step()


def _assert_same_params(model, ref, tol=1e-11, what=""):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        err = (full.detach() - q.detach()).abs().max().item()
        assert err <= tol * (1 + q.abs().max().item()), f"{what}{name}: max abs diff {err:.3g}"


def _fsdp_adamw_trajectory(rank, world):
    import fastreg.optim
    from torch.distributed.tensor import DTensor

    model = _shard(_model(), world)
    opt = fastreg.optim.AdamW(model.parameters(), **ADAMW)
    _train(model, opt, rank, world, STEPS)
    _assert_same_params(model, _reference(STEPS), what="FSDP2 + fastreg AdamW vs torch AdamW, ")
    # state as torch.optim keeps it: DTensors with the parameter's placements, a plain step
    for p in model.parameters():
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq"):
            assert isinstance(st[k], DTensor) and st[k].placements == p.placements, k
        assert not isinstance(st["step"], DTensor) and float(st["step"]) == STEPS

    # state_dict interchangeable with torch.optim: fastreg for 10 steps, torch for 10 more, and back
    for first, second in ((fastreg.optim.AdamW, torch.optim.AdamW), (torch.optim.AdamW, fastreg.optim.AdamW)):
        model = _shard(_model(), world)
        opt = first(model.parameters(), **ADAMW)
        _train(model, opt, rank, world, 10)
        opt2 = second(model.parameters(), **ADAMW)
        opt2.load_state_dict(opt.state_dict())
        _train(model, opt2, rank, world, 10, first=10)
        _assert_same_params(model, _reference(STEPS), what=f"{first.__module__} -> {second.__module__}: ")


def test_fsdp2_fastreg_adamw_equals_single_process_torch_adamw():
    run_distributed(_fsdp_adamw_trajectory, 2)


def _ddp_loss(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model())
    ref = _model()
    x, t = _data(0)
    rows = slice(rank * N // world, (rank + 1) * N // world)
    model(x[rows], t[rows]).backward()
    ref(x, t).backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_loss_under_ddp():
    run_distributed(_ddp_loss, 2)


def _dcp_save(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import fastreg.optim

    model = _shard(_model(), world)
    opt = fastreg.optim.AdamW(model.parameters(), **ADAMW)
    _train(model, opt, rank, world, 10)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _dcp_load_and_continue(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import fastreg.optim

    model = _shard(_model(), world)
    opt = fastreg.optim.AdamW(model.parameters(), **ADAMW)
    msd, osd = get_state_dict(model, opt)  # the optimizer state is created lazily by DCP here
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _assert_same_params(model, _reference(10), what="after 4 -> 2 rank reload: ")
    _train(model, opt, rank, world, 10, first=10)
    _assert_same_params(model, _reference(STEPS), what="4 -> 2 rank reload, 10 more steps: ")


def test_dcp_checkpoint_4_ranks_loaded_into_2(tmp_path):
    path = str(tmp_path / "ckpt")
    run_distributed(_dcp_save, 4, path)
    run_distributed(_dcp_load_and_continue, 2, path)


def _scaler_skip(rank, world, unscale_first):
    import torch.distributed as dist
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    import fastreg.optim

    model = _shard(_model(), world)
    opt = fastreg.optim.AdamW(model.parameters(), **ADAMW)
    scaler = ShardedGradScaler(device="cpu", init_scale=1024.0)
    for s in range(3):
        x, t = _data(s)
        rows = slice(rank * N // world, (rank + 1) * N // world)
        opt.zero_grad()
        scaler.scale(model(x[rows], t[rows])).backward()
        if s == 2 and rank == 1:  # an overflow on one rank only
            next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("inf")
        before = ([p.detach().to_local().clone() for p in model.parameters()],
                  [{k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in opt.state[p].items()}
                   for p in model.parameters()])
        if unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    after_params = [p.detach().to_local() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after_params, before[0])), f"rank {rank} stepped on an overflow"
    for p, st in zip(model.parameters(), before[1]):
        for k, v in opt.state[p].items():
            assert torch.equal(v.to_local() if hasattr(v, "to_local") else v, st[k]), f"rank {rank}: state {k} changed"
    assert float(opt.state[next(iter(model.parameters()))]["step"]) == 2
    if unscale_first:  # ShardedGradScaler.unscale_ synchronised found_inf: the scale backed off everywhere
        scales = [None] * world
        dist.all_gather_object(scales, scaler.get_scale())
        assert scales == [512.0] * world, scales


@pytest.mark.parametrize("unscale_first", [False, True])
def test_sharded_grad_scaler_overflow_on_one_rank_skips_everywhere(unscale_first):
    run_distributed(_scaler_skip, 2, unscale_first)
