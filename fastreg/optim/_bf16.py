"""bf16 training modes of fastreg's fused optimizers: stochastic rounding and fp32 master weights.

Both are per param group options (``stochastic_rounding``, ``master_weights``; constructor
arguments set the default) carried out inside the one fused kernel call of a step:

* ``stochastic_rounding=True`` (bfloat16 params): the updated fp32 value of every element is
  rounded down or up to a neighbouring bf16 value with probabilities proportional to its distance
  from each, so the stored parameter equals the exact update in expectation and updates far below
  half a bf16 ulp still move it on average. The random bits are Philox4x32-10 outputs keyed by
  (``sr_seed``, the step count, tensor, element index): a run is reproducible, the CPU and the CUDA
  kernels write the same bits, thread counts and launch layouts do not matter. Each param group
  draws its ``sr_seed`` from torch's default generator when it is added (only groups using the
  mode draw, so a plain optimizer consumes no random numbers); it is kept in the group, hence in
  ``state_dict``. SGD then counts steps per parameter in ``state["step"]`` (Adam has its own).
* ``master_weights=True`` (bfloat16 or float16 params): ``state["master_param"]``, an fp32 copy of
  the parameter, takes the update; the parameter receives its nearest rounding. A state without
  it (a fresh optimizer, a torch.optim checkpoint) starts it from the parameter's value;
  ``load_state_dict`` keeps a saved copy in fp32.

Optimizer states (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq) stay in the parameter
dtype in both modes, as torch.optim keeps them: checkpoints stay interchangeable and a bf16 Adam
step moves 14 bytes per parameter (master weights add exactly 8: the fp32 copy read and written).
The two modes are exclusive (the parameter is the nearest rounding of its master copy).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

MASTER_KEY = "master_param"
_MODES = ("stochastic_rounding", "master_weights")


def mode_defaults(stochastic_rounding: bool, master_weights: bool) -> dict[str, bool]:
    """The constructor's mode arguments as param-group defaults (checked for type)."""
    for name, value in zip(_MODES, (stochastic_rounding, master_weights)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return {"stochastic_rounding": stochastic_rounding, "master_weights": master_weights}


def check_group(group: dict) -> None:
    """Refuses a param group whose modes do not fit its parameters; draws its seed."""
    sr, master = bool(group.get("stochastic_rounding")), bool(group.get("master_weights"))
    if sr and master:
        raise ValueError("stochastic_rounding and master_weights are exclusive: with master weights the params "
                         "are the nearest rounding of their fp32 copy")
    for p in group["params"]:
        if sr and p.dtype != torch.bfloat16:
            raise ValueError(f"stochastic_rounding=True needs bfloat16 params, got a {p.dtype} param "
                             f"of shape {tuple(p.shape)}")
        if master and p.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"master_weights=True needs bfloat16 or float16 params, got a {p.dtype} param "
                             f"of shape {tuple(p.shape)}")
    if sr and "sr_seed" not in group:
        group["sr_seed"] = int(torch.randint(0, 2**62, (), dtype=torch.int64))


def call_seed(group: dict) -> int:
    """The operators' sr_seed argument: the group's seed, or -1 when the mode is off."""
    return int(group["sr_seed"]) if group.get("stochastic_rounding") else -1


def init_master(p: Tensor, state: dict, group: dict) -> None:
    if group.get("master_weights") and MASTER_KEY not in state:
        state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)


def pop_masters(optimizer, state_dict: dict) -> dict[int, Tensor]:
    """Removes the fp32 master copies from a state_dict about to be loaded (torch's loader would
    cast them to the parameters' dtype) and returns them by parameter position."""
    saved = {}
    state = state_dict.get("state", {})
    ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
    for pos, pid in enumerate(ids):
        entry = state.get(pid)
        if isinstance(entry, dict) and MASTER_KEY in entry:
            saved[pos] = entry[MASTER_KEY]
    if saved:
        state_dict = dict(state_dict)
        state_dict["state"] = {k: ({n: t for n, t in v.items() if n != MASTER_KEY} if isinstance(v, dict) else v)
                               for k, v in state.items()}
    return saved, state_dict


def restore_masters(optimizer, saved: dict[int, Tensor]) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pos, master in saved.items():
        p = params[pos]
        optimizer.state[p][MASTER_KEY] = master.to(device=p.device, dtype=torch.float32, copy=True)


def strip_unused(state_dict: dict) -> dict:
    """A plain optimizer's state_dict without the mode keys, so that its layout is torch.optim's
    exactly; kept as soon as any group uses a mode (a missing key loads as the constructor's)."""
    groups = state_dict["param_groups"]
    if any(g.get(name) for g in groups for name in _MODES):
        return state_dict
    state_dict["param_groups"] = [{k: v for k, v in g.items() if k not in _MODES} for g in groups]
    return state_dict


def fill_modes(optimizer) -> None:
    """Groups without mode keys (loaded from a torch.optim checkpoint, or an old pickle) take the
    constructor's modes."""
    for group in optimizer.param_groups:
        for name in _MODES:
            group.setdefault(name, optimizer.defaults.get(name, False))


def after_load(optimizer, old_groups: list[dict[str, Any]]) -> None:
    """After load_state_dict: the modes are filled in (fill_modes ran), groups keep the seeds they
    had before the load unless the checkpoint brought one, and the modes are checked."""
    for group, old in zip(optimizer.param_groups, old_groups):
        if "sr_seed" not in group and "sr_seed" in old:
            group["sr_seed"] = old["sr_seed"]
        check_group(group)
