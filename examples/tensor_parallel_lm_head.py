"""Tensor-parallel LM head: the vocabulary split over 2 processes, fastreg's vocab-parallel loss.

In tensor parallelism the output layer of a language model (hidden size D -> vocabulary V) is
split over the vocabulary: with ``ColwiseParallel`` each of the W ranks keeps V/W rows of the
weight, a ``Shard(0)`` DTensor. ``fastreg.distributed.linear_cross_entropy(hidden, weight, target)``
computes the cross-entropy straight from that shard — no rank ever holds the whole weight or a
whole row of logits; per chunk of tokens the ranks exchange a few numbers per token (local
log-sum-exp, the target's logit) — and returns a replicated loss whose gradient reaches the
sharded weight as a ``Shard(0)`` DTensor. fastreg's AdamW steps the DTensor and plain parameters
alike, in one fused call per (device, dtype).

This script trains a tiny next-token model (embedding -> MLP -> tensor-parallel head) on a
synthetic "language" for a few steps, and checks every step against one process training the same
model with the full head, ``F.cross_entropy`` and ``torch.optim.AdamW``.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel_lm_head.py
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel_lm_head.py --fast     # used by the tests
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

import fastreg.optim
from fastreg.distributed import linear_cross_entropy


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def hidden(self, tokens):
        h = self.embed(tokens)
        return self.norm(h + self.mlp(h))


def synthetic_batch(step: int, batch: int, seq: int, vocab: int):
    """Sequences of a toy language: each token is (3 * previous + 7) mod vocab, with 10 % noise."""
    g = torch.Generator().manual_seed(step)
    first = torch.randint(0, vocab, (batch, 1), generator=g)
    cols = [first]
    for _ in range(seq):
        cols.append((3 * cols[-1] + 7) % vocab)
    seqs = torch.cat(cols, 1)
    noise = torch.rand(seqs.shape, generator=g) < 0.1
    seqs = torch.where(noise, torch.randint(0, vocab, seqs.shape, generator=g), seqs)
    return seqs[:, :-1], seqs[:, 1:]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fast", action="store_true", help="a smaller model, fewer steps")
    args = parser.parse_args()
    vocab, dim, batch, seq, steps = (1001, 32, 8, 32, 10) if args.fast else (50257, 128, 8, 128, 30)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    torch.manual_seed(0)
    model = TinyLM(vocab, dim)
    reference = copy.deepcopy(model)  # one process, the whole head, plain PyTorch
    # the head is split over the vocabulary: each rank keeps a Shard(0) slice of lm_head.weight
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    w = model.lm_head.weight
    if rank == 0:
        print(f"{world} ranks; lm_head.weight {tuple(w.shape)} as {type(w).__name__} {w.placements}, "
              f"local shard {tuple(w.to_local().shape)} on rank 0")

    opt = fastreg.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01)
    worst = 0.0
    for step in range(steps):
        tokens, target = synthetic_batch(step, batch, seq, vocab)
        h = model.hidden(tokens).reshape(-1, dim)
        loss = linear_cross_entropy(h, model.lm_head.weight, target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

        ref_loss = F.cross_entropy(reference.lm_head(reference.hidden(tokens)).reshape(-1, vocab), target.reshape(-1))
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        diff = abs(loss.full_tensor().item() - ref_loss.item())
        worst = max(worst, diff)
        if rank == 0:
            print(f"step {step:2d}  loss {loss.full_tensor().item():.5f}  (one process, full head: "
                  f"{ref_loss.item():.5f})")
    head = model.lm_head.weight.full_tensor()
    param_diff = (head - reference.lm_head.weight.detach()).abs().max().item()
    if rank == 0:
        print(f"largest loss difference over {steps} steps: {worst:.2e}")
        print(f"largest lm_head weight difference after training: {param_diff:.2e}")
        print(f"optimizer state of the head: exp_avg is a {type(opt.state[w]['exp_avg']).__name__} "
              f"{opt.state[w]['exp_avg'].placements}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("run me with torchrun: torchrun --standalone --nproc-per-node 2 examples/tensor_parallel_lm_head.py")
    main()
