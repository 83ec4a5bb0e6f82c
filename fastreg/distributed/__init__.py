"""fastreg on torch.distributed.

* :func:`linear_cross_entropy` — the fused linear cross-entropy with the LM head split over the
  vocabulary across a process group (tensor parallelism): DTensor ``Shard(0)`` weights, or plain
  local shards with ``process_group=`` (Megatron style). No rank holds the full weight or a full
  row of logits; per chunk of rows one all-reduce of O(rows) statistics.
* The fused optimizers (``fastreg.optim``) accept DTensor parameters (FSDP2 ``fully_shard``,
  tensor parallel) directly; see fastreg/optim/_base.py.
* Under DDP, or inside a ``fully_shard``ed module's forward (where the weight is already
  unsharded), the ordinary ``fastreg.linear_cross_entropy`` is the right call.
"""
from .vocab_parallel import linear_cross_entropy

__all__ = ["linear_cross_entropy"]
