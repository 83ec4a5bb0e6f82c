"""Train a Hugging Face causal LM with fastreg's fused loss: one line, same losses, less memory.

    from fastreg.integrations import transformers as fastreg_hf
    fastreg_hf.apply(model)      # model(input_ids, labels=labels).loss never materialises the logits

A tiny randomly initialised Llama (2 layers, hidden 128; 64 with --fast) with a Llama-2-sized
vocabulary (32,000) learns a short built-in text, byte by byte, for a few steps twice: unpatched
and patched, from the same initial weights on the same batches. The script prints both loss
curves (they agree), the median time of a training step (the two runs interleaved step by step)
and the peak extra memory of one (each measured in a fresh process on the CPU: peak RSS above the
RSS after a warm-up step, read with fastreg's cache of freed CPU buffers emptied; on a GPU: the
CUDA allocator's peak; docs/benchmarks-method.md). With a real vocabulary the logits (tokens x 32,000 floats, plus their
softmax and gradient) dominate that memory; patched, they are never stored whole.

    python examples/hf_causal_lm.py            # 8 sequences x 256 bytes, 20 steps
    python examples/hf_causal_lm.py --fast     # 4 x 64, 5 steps, hidden 64 (used by the tests)
"""
import argparse
import statistics
import time

import torch

try:
    import transformers
except ImportError:
    raise SystemExit("this example needs Hugging Face transformers: pip install fastreg[transformers]")

from fastreg.bench.common import peak_extra_bytes, report_to_parent, run_child
from fastreg.integrations import transformers as fastreg_hf

VOCAB = 32_000  # Llama 2's; the text uses byte values 0..255 of it, as a byte-fallback tokenizer would
TEXT = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of
Light, it was the season of Darkness, it was the spring of hope, it was the winter of despair, we
had everything before us, we had nothing before us, we were all going direct to Heaven, we were all
going direct the other way - in short, the period was so far like the present period, that some of
its noisiest authorities insisted on its being received, for good or for evil, in the superlative
degree of comparison only. There were a king with a large jaw and a queen with a plain face, on the
throne of England; there were a king with a large jaw and a queen with a fair face, on the throne of
France. In both countries it was clearer than crystal to the lords of the State preserves of loaves
and fishes, that things in general were settled for ever.
"""


def make_model(device: str, hidden: int):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).to(device).train()


def batches(batch: int, seq: int, steps: int, device: str):
    """Random windows of the text as byte ids (labels = input ids: the model shifts them)."""
    data = torch.tensor(list(TEXT.encode()), dtype=torch.long)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        start = torch.randint(0, len(data) - seq, (batch,), generator=g)
        out.append(torch.stack([data[s:s + seq] for s in start.tolist()]).to(device))
    return out


def train_both(batch: int, seq: int, steps: int, hidden: int, device: str) -> dict:
    """Both models side by side on the same batches, their steps interleaved (alternating which
    goes first) so that a busy machine slows both alike. Returns {name: (losses, step seconds)}."""
    runs = {}
    for name in ("unpatched", "patched"):
        model = make_model(device, hidden)
        if name == "patched":
            fastreg_hf.apply(model)
        runs[name] = (model, torch.optim.AdamW(model.parameters(), lr=3e-3), [], [])
    for i, ids in enumerate(batches(batch, seq, steps, device)):
        for name in (("unpatched", "patched") if i % 2 == 0 else ("patched", "unpatched")):
            model, opt, losses, times = runs[name]
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())  # also waits for the GPU
            times.append(time.perf_counter() - t0)
            assert (out.logits is None) == (name == "patched")
    return {name: (losses, times) for name, (_, _, losses, times) in runs.items()}


def peak_extra_memory(patched: bool, batch: int, seq: int, hidden: int, device: str) -> int:
    """Peak bytes above the model during one forward+backward (after a warm-up), gradients included."""
    model = make_model(device, hidden)
    if patched:
        fastreg_hf.apply(model)
    ids = batches(batch, seq, 1, device)[0]
    return peak_extra_bytes(lambda: model(ids, labels=ids).loss.backward(),
                            lambda: model.zero_grad(set_to_none=True), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="small batch, few steps (for the tests)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--measure", choices=["patched", "unpatched"], help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    batch, seq, steps, hidden = (4, 64, 5, 64) if args.fast else (8, 256, 20, 128)
    if args.measure:  # the fresh process started by run_child() below
        report_to_parent({"peak_extra_bytes": peak_extra_memory(args.measure == "patched", batch, seq, hidden,
                                                                args.device)})
        return

    tokens = batch * seq
    print(f"tiny Llama (2 layers, hidden {hidden}, vocabulary {VOCAB}) on {len(TEXT.encode())} bytes of text, "
          f"{batch} x {seq} = {tokens} tokens per step, {steps} steps, device {args.device}")
    runs = train_both(batch, seq, steps, hidden, args.device)
    print("\nstep  loss unpatched  loss patched (fastreg)")
    for i, (a, b) in enumerate(zip(runs["unpatched"][0], runs["patched"][0])):
        print(f"{i + 1:4d}  {a:14.4f}  {b:12.4f}")
    diff = max(abs(a - b) for a, b in zip(runs["unpatched"][0], runs["patched"][0]))
    print(f"largest loss difference over the run: {diff:.2e}")

    # the first step includes one-off set-up: the median is over the rest
    t = {k: statistics.median(v[1][1:]) * 1e3 for k, v in runs.items()}
    print(f"\nmedian step time (forward + backward + AdamW): unpatched {t['unpatched']:.1f} ms, "
          f"patched {t['patched']:.1f} ms ({t['unpatched'] / t['patched']:.2f}x)")

    peaks = {}
    for name in ("unpatched", "patched"):
        if args.device == "cuda":
            peaks[name] = peak_extra_memory(name == "patched", batch, seq, hidden, "cuda")
        else:
            res = run_child([__file__, "--measure", name, "--device", "cpu"] + (["--fast"] if args.fast else []))
            if "error" in res:
                raise SystemExit(res["error"])
            peaks[name] = res["peak_extra_bytes"]
    mib = 2 ** 20
    print(f"the logits alone take {tokens * VOCAB * 4 / mib:.1f} MiB ({tokens} x {VOCAB} x 4 bytes)")
    print(f"peak extra memory of one forward+backward: unpatched {peaks['unpatched'] / mib:.1f} MiB, "
          f"patched {peaks['patched'] / mib:.1f} MiB (saved {(peaks['unpatched'] - peaks['patched']) / mib:.1f} MiB)")


if __name__ == "__main__":
    main()
