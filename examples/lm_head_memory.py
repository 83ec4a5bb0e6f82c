"""How much memory fastreg.linear_cross_entropy saves in a language model's output layer.

A language model ends with a "head": a linear layer from the hidden size D to the vocabulary V
(here V = 50,257, GPT-2's), followed by softmax cross-entropy against the next token. Written the
usual way,

    logits = hidden @ lm_head.weight.T          # (tokens, V): 4 bytes x tokens x 50,257
    loss = F.cross_entropy(logits, targets)

the (tokens x V) logits, their log-softmax and their gradient all exist at once, which is usually
the largest allocation of the whole training step. ``fastreg.linear_cross_entropy(hidden,
lm_head.weight, targets)`` computes the same loss and gradients chunk by chunk and never stores
the logits whole.

This script builds a tiny model (embedding -> one MLP block -> head tied to the embedding),
checks that both losses and all gradients agree, then measures the peak extra memory of one
forward + backward pass of each, every measurement in a fresh process (on a GPU: the CUDA
allocator's peak), after a warm-up step and with fastreg's cache of freed CPU buffers emptied
before the baseline is read, so buffers kept from the warm-up count (docs/benchmarks-method.md).

    python examples/lm_head_memory.py           # 8 sequences x 128 tokens
    python examples/lm_head_memory.py --fast    # 2 x 64 tokens (used by the tests)
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

import fastreg
from fastreg.bench.common import cuda_peak_extra_bytes, report_to_parent, rss_peak_extra_bytes, run_child

VOCAB = 50_257
HIDDEN = 256


class TinyLM(nn.Module):
    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied input/output embeddings, as in GPT-2
        nn.init.normal_(self.embed.weight, std=0.02)  # GPT-2's initialisation: logits start near 0

    def hidden_states(self, tokens):
        h = self.embed(tokens)
        return h + self.mlp(self.norm(h))

    def loss_eager(self, tokens, targets):
        logits = self.lm_head(self.hidden_states(tokens))  # (batch, seq, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def loss_fastreg(self, tokens, targets):
        h = self.hidden_states(tokens)
        return fastreg.linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())


def make_batch(batch: int, seq: int, device: str):
    """A model and a batch of random token ids; targets are the next token of each position."""
    torch.manual_seed(0)
    model = TinyLM().to(device)
    tokens = torch.randint(0, VOCAB, (batch, seq + 1), device=device)
    return model, tokens[:, :-1], tokens[:, 1:]


def train_step(model, loss_fn, tokens, targets):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(tokens, targets)
    loss.backward()
    return loss


def peak_extra_memory(which: str, batch: int, seq: int, device: str) -> int:
    """Peak bytes above the model + batch during one forward+backward (after a warm-up step)."""
    model, tokens, targets = make_batch(batch, seq, device)
    loss_fn = model.loss_eager if which == "eager" else model.loss_fastreg
    step = lambda: train_step(model, loss_fn, tokens, targets)  # noqa: E731
    reset = lambda: model.zero_grad(set_to_none=True)  # noqa: E731
    if device == "cuda":
        step()  # warm-up
        return cuda_peak_extra_bytes(step, reset)
    return rss_peak_extra_bytes(step, reset)["peak_extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a smaller batch (for the tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure", choices=["eager", "fastreg"], help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    batch, seq = (2, 64) if args.fast else (8, 128)

    if args.measure:  # we are the fresh process started by run_child() below
        report_to_parent({"peak_extra_bytes": peak_extra_memory(args.measure, batch, seq, args.device)})
        return

    tokens_n = batch * seq
    print(f"tiny LM: vocabulary {VOCAB}, hidden {HIDDEN}, batch {batch} x {seq} = {tokens_n} tokens, "
          f"device {args.device}")

    # 1. Same loss, same gradients.
    model, tokens, targets = make_batch(batch, seq, args.device)
    loss_e = train_step(model, model.loss_eager, tokens, targets)
    grads_e = {n: p.grad.clone() for n, p in model.named_parameters()}
    loss_f = train_step(model, model.loss_fastreg, tokens, targets)
    max_rel = max(((p.grad - grads_e[n]).norm() / grads_e[n].norm()).item() for n, p in model.named_parameters())
    print(f"loss eager {loss_e.item():.6f}  fastreg {loss_f.item():.6f}  "
          f"difference {abs(loss_e.item() - loss_f.item()):.2e}")
    print(f"largest relative gradient difference over all parameters: {max_rel:.2e}")
    del model, tokens, targets, grads_e

    # 2. Peak extra memory of one training step, each measured in a fresh process.
    peaks = {}
    for which in ("eager", "fastreg"):
        if args.device == "cuda":
            peaks[which] = peak_extra_memory(which, batch, seq, args.device)
        else:
            res = run_child([__file__, "--measure", which, "--device", "cpu"] + (["--fast"] if args.fast else []))
            if "error" in res:
                raise SystemExit(res["error"])
            peaks[which] = res["peak_extra_bytes"]
    mib = 2 ** 20
    logits_bytes = tokens_n * VOCAB * 4
    print(f"\nthe logits alone take {logits_bytes / mib:.1f} MiB ({tokens_n} x {VOCAB} x 4 bytes)")
    print(f"peak extra memory of one training step: eager {peaks['eager'] / mib:.1f} MiB, "
          f"fastreg {peaks['fastreg'] / mib:.1f} MiB")
    saved = peaks["eager"] - peaks["fastreg"]
    print(f"memory saved by fastreg.linear_cross_entropy: {saved / mib:.1f} MiB "
          f"({peaks['eager'] / max(peaks['fastreg'], 1):.1f}x less)")


if __name__ == "__main__":
    main()
