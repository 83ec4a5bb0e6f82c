"""fastreg.integrations.transformers: a patched Hugging Face causal LM gives the unpatched model's
loss and gradients (fp32) without materialising the logits, trains the same under Trainer, and
uses less memory. Tiny randomly initialised configs, no downloads."""
import copy
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import fastreg  # noqa: E402
from fastreg.integrations import transformers as fhf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, HIDDEN = 1000, 64


def make_model(name: str, vocab: int = VOCAB, tie: bool | None = None, **extra):
    """A tiny random model of a supported class (2 layers, hidden 64), dropout off, fp32."""
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cls = transformers.GPT2LMHeadModel
    elif name == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif name == "mistral":
        cfg, cls = transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM
    elif name == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif name == "qwen3":
        cfg, cls = transformers.Qwen3Config(**common, head_dim=16), transformers.Qwen3ForCausalLM
    elif name == "gemma":
        cfg, cls = transformers.GemmaConfig(**common, head_dim=16), transformers.GemmaForCausalLM
    elif name == "gemma2":
        # a small softcap and a wide init so the softcap really changes the loss (checked below)
        cfg = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=2.0, initializer_range=0.2,
                                        attn_logit_softcapping=50.0, query_pre_attn_scalar=16)
        cls = transformers.Gemma2ForCausalLM
    elif name == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, head_dim=16, final_logit_softcapping=2.0,
                                            initializer_range=0.2, query_pre_attn_scalar=16)
        cls = transformers.Gemma3ForCausalLM
    elif name == "phi3":
        cfg = transformers.Phi3Config(**common, pad_token_id=0)
        cls = transformers.Phi3ForCausalLM
    else:
        raise ValueError(name)
    for k, v in extra.items():
        setattr(cfg, k, v)
    if tie is not None:
        cfg.tie_word_embeddings = tie
    cfg._attn_implementation = "eager"
    model = cls(cfg).float()
    model.train()
    return model


MODELS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]


def make_batch(case: str, batch: int = 3, seq: int = 17, vocab: int = VOCAB):
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    kwargs = {"labels": input_ids.clone()}
    if case in ("padded", "num_items"):
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq - 5:] = 0  # right padding of the first sequence
        mask[2, seq - 2:] = 0
        kwargs["attention_mask"] = mask
        kwargs["labels"][mask == 0] = -100
        kwargs["labels"][1, 3:7] = -100  # prompt tokens not trained on
    if case == "num_items":
        # gradient accumulation: the loss is a sum over this micro-batch divided by the count of
        # the whole accumulated batch (here: twice this one's)
        kwargs["num_items_in_batch"] = 2 * (kwargs["labels"][:, 1:] != -100).sum()
    return input_ids, kwargs


def loss_and_grads(model, input_ids, kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict, want: dict, rtol: float = 1e-4):
    assert got.keys() == want.keys()
    for n, g in want.items():
        err = (got[n] - g).norm().item()
        assert err <= rtol * g.norm().item() + 1e-7, f"{n}: |diff| {err:.3g} vs |grad| {g.norm().item():.3g}"


# "num_items" has padding and ignored labels too; "padded" (mean over the kept tokens) for a few
@pytest.mark.parametrize("name,case", [(m, c) for m in MODELS for c in ("plain", "num_items")]
                         + [(m, "padded") for m in ("llama", "gpt2", "gemma2")])
def test_loss_and_every_gradient_match_unpatched(name, case):
    ref = make_model(name)
    model = fhf.apply(copy.deepcopy(ref))
    input_ids, kwargs = make_batch(case)
    out_ref, grads_ref = loss_and_grads(ref, input_ids, kwargs)
    out, grads = loss_and_grads(model, input_ids, kwargs)
    assert out.logits is None and out_ref.logits.shape == (*input_ids.shape, VOCAB)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    # every trainable parameter got a gradient in both (tied embeddings: one parameter, both uses)
    assert grads_ref.keys() == {n for n, p in ref.named_parameters() if p.requires_grad}
    assert_same_grads(grads, grads_ref)


@pytest.mark.parametrize("name,tie", [("llama", True), ("llama", False), ("gpt2", True), ("gemma2", True)])
def test_tied_and_untied_embeddings(name, tie):
    ref = make_model(name, tie=tie)
    model = fhf.apply(copy.deepcopy(ref))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is embed.weight) == tie
    input_ids, kwargs = make_batch("padded")
    out_ref, grads_ref = loss_and_grads(ref, input_ids, kwargs)
    out, grads = loss_and_grads(model, input_ids, kwargs)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert_same_grads(grads, grads_ref)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_softcap_is_applied(name):
    # the configs' softcap must matter, or the equality above would not show it is handled
    model = make_model(name)
    input_ids, kwargs = make_batch("plain")
    capped = model(input_ids, **kwargs).loss.item()
    model.config.final_logit_softcapping = None
    uncapped = model(input_ids, **kwargs).loss.item()
    fhf.apply(model)
    assert abs(model(input_ids, **kwargs).loss.item() - uncapped) < 1e-5
    model.config.final_logit_softcapping = 2.0
    out = model(input_ids, **kwargs)
    assert out.logits is None and abs(out.loss.item() - capped) < 1e-5
    assert abs(capped - uncapped) > 1e-2


def test_without_labels_the_model_is_unchanged():
    ref = make_model("llama")
    model = fhf.apply(copy.deepcopy(ref))
    input_ids, _ = make_batch("plain")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, ref(input_ids).logits)
        gen = model.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
        gen_ref = ref.generate(input_ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_ref)


def test_return_dict_false_positional_labels_and_shift_labels():
    ref = make_model("llama")
    model = fhf.apply(copy.deepcopy(ref))
    input_ids, kwargs = make_batch("padded")
    want = ref(input_ids, **kwargs).loss.detach()
    tup = model(input_ids, return_dict=False, **kwargs)
    assert isinstance(tup, tuple) and torch.allclose(tup[0].detach(), want, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(t, torch.Tensor) and t.shape[-1:] == (VOCAB,) for t in tup)  # no logits
    # labels passed by position (input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels)
    pos = model(input_ids, kwargs["attention_mask"], None, None, None, kwargs["labels"])
    assert pos.logits is None
    torch.testing.assert_close(pos.loss.detach(), want, rtol=1e-5, atol=1e-6)
    # pre-shifted labels (context parallelism) take precedence, as in transformers
    shifted = F.pad(kwargs["labels"], (0, 1), value=-100)[..., 1:]
    got = model(input_ids, attention_mask=kwargs["attention_mask"], labels=kwargs["labels"] * 0,
                shift_labels=shifted)
    assert got.logits is None
    torch.testing.assert_close(got.loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_under_no_grad_logits_stay_for_evaluation_unless_asked():
    ref = make_model("llama")
    model = fhf.apply(copy.deepcopy(ref))
    input_ids, kwargs = make_batch("num_items")
    with torch.no_grad():
        want = ref(input_ids, **kwargs)
        out = model(input_ids, **kwargs)  # e.g. Trainer.evaluate computing metrics from the logits
        torch.testing.assert_close(out.logits, want.logits)
        torch.testing.assert_close(out.loss, want.loss)
        fhf.apply(model, eval_logits=False)
        out = model(input_ids, **kwargs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_fastreg_loss_options_match_their_definition():
    model = fhf.apply(make_model("gemma2"), z_loss=1e-2, label_smoothing=0.1)
    input_ids, kwargs = make_batch("padded")
    out = model(input_ids, **kwargs)
    assert out.logits is None
    fhf.revert(model)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=kwargs["attention_mask"]).logits[:, :-1].reshape(-1, VOCAB)
    target = kwargs["labels"][:, 1:].reshape(-1)
    keep = target != -100
    want = (F.cross_entropy(logits, target, label_smoothing=0.1)
            + 1e-2 * (torch.logsumexp(logits[keep], -1) ** 2).mean())
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_apply_is_idempotent_revertible_and_deepcopyable():
    ref = make_model("qwen2")
    model = fhf.apply(fhf.apply(copy.deepcopy(ref)))
    assert fhf.is_applied(model)
    input_ids, kwargs = make_batch("num_items")
    want, grads_ref = loss_and_grads(ref, input_ids, kwargs)
    twin = copy.deepcopy(model)  # the patch travels with the copy and drives the copy's weights
    for m in (model, twin):
        out, grads = loss_and_grads(m, input_ids, kwargs)
        assert out.logits is None
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)
        assert_same_grads(grads, grads_ref)
    assert twin._fastreg_head is twin.lm_head and twin._fastreg_head is not model.lm_head
    fhf.revert(model)
    assert not fhf.is_applied(model) and "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model(input_ids, **kwargs).logits is not None


def test_unsupported_model_gets_a_clear_error():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, num_labels=3)
    with pytest.raises(TypeError, match="LlamaForSequenceClassification is not supported.*LlamaForCausalLM.*GPT2LMHeadModel"):
        fhf.apply(transformers.LlamaForSequenceClassification(cfg))
    with pytest.raises(TypeError, match="Linear is not supported"):
        fhf.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="label_smoothing"):
        fhf.apply(make_model("llama"), label_smoothing=1.5)


def test_import_error_names_the_extra():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import fastreg.integrations.transformers\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "IMPORTERROR" in proc.stdout and "pip install fastreg[transformers]" in proc.stdout, proc.stderr


def test_ten_training_steps_match_plain_loop():
    # SGD: its update is linear in the gradient, so parameters must agree as tightly as gradients
    # (Adam would turn fp32 noise in exactly-zero gradients, e.g. GPT-2's key biases, into lr-sized steps)
    ref = make_model("gpt2")
    model = fhf.apply(copy.deepcopy(ref))
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = fastreg.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses, losses_ref = [], []
    input_ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    for step in range(10):
        for m, o, log in ((ref, opt_ref, losses_ref), (model, opt, losses)):
            o.zero_grad()
            loss = m(input_ids, labels=input_ids).loss
            loss.backward()
            o.step()
            log.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0] - 1.0  # it learns (memorises the batch)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int):
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = torch.ones_like(self.ids[i])
        pad = i % 4  # varied right padding -> varied token counts per micro-batch
        if pad:
            mask[-pad:] = 0
        labels = self.ids[i].masked_fill(mask == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels}


def train_with_trainer(model, tmp_path, steps: int, optimizers=(None, None)):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(64, 16), optimizers=optimizers)
    assert trainer.model_accepts_loss_kwargs  # so Trainer passes num_items_in_batch to the patched forward
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_ten_steps_match_unpatched_with_fastreg_adamw(tmp_path):
    ref = make_model("llama")
    init = copy.deepcopy(ref)
    model = fhf.apply(copy.deepcopy(ref))
    losses_ref = train_with_trainer(ref, tmp_path / "ref", 10)
    # the documented two-line recipe: fastreg's fused AdamW as Trainer's optimizer
    opt = fastreg.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = train_with_trainer(model, tmp_path / "fastreg", 10, optimizers=(opt, None))
    assert len(losses) == len(losses_ref) == 10
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_ref), rtol=1e-4, atol=1e-5)
    # Adam normalises each gradient element, so an element with a tiny gradient (sparse embedding
    # rows) turns an fp32 rounding difference into a visible step difference: compare each
    # parameter's distance to the reference run with how far training moved it (measured:
    # <= 1.2e-3 for embed_tokens, <= 5e-5 for the rest)
    for (n, p), (_, q), (_, q0) in zip(model.named_parameters(), ref.named_parameters(), init.named_parameters()):
        moved = (q - q0).norm().item()
        assert moved > 0 and (p - q).norm().item() <= 5e-3 * moved, n


def test_example_trains_the_same_with_less_memory():
    """examples/hf_causal_lm.py --fast: same loss curve patched and unpatched, and the patched
    forward+backward's peak memory (fresh process each, RSS) is lower by at least the logits'
    size at a Llama-2-sized vocabulary of 32,000."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "hf_causal_lm.py"), "--fast"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    rows = [(float(a), float(b)) for a, b in re.findall(r"^\s+\d+\s+([\d.]+)\s+([\d.]+)$", out, re.M)]
    assert len(rows) >= 4
    for unpatched, patched in rows:
        assert abs(unpatched - patched) <= 1e-4 * unpatched
    assert rows[-1][0] < rows[0][0] - 0.5  # it learns the text (measured: 10.36 -> 9.04)
    logits = float(re.search(r"the logits alone take ([\d.]+) MiB", out).group(1))
    unpatched, patched = map(float, re.search(r"unpatched ([\d.]+) MiB, patched ([\d.]+) MiB", out).groups())
    assert unpatched - patched >= logits, out
    assert re.search(r"median step time .* unpatched [\d.]+ ms, patched [\d.]+ ms", out)


def test_bfloat16_gradients_as_accurate_as_transformers():
    # Against the float64 model: every gradient of the patched bf16 model is within 2x the error of
    # transformers' own bf16 path (which upcasts the logits to fp32 for the loss). The loss VALUE is
    # fastreg's, returned in the input dtype: rounded to bf16 (<= half a bf16 ulp, ~0.2 %), where
    # transformers reports it in fp32 — the known gap of the integration in bf16.
    ref = make_model("llama")
    model = fhf.apply(copy.deepcopy(ref)).bfloat16()
    ref64, ref16 = copy.deepcopy(ref).double(), copy.deepcopy(ref).bfloat16()
    input_ids, kwargs = make_batch("padded")
    (out64, g64), (out16, g16), (out, g) = (loss_and_grads(m, input_ids, kwargs) for m in (ref64, ref16, model))
    assert out.logits is None
    for n, want in g64.items():
        err = (g[n].double() - want).norm().item()
        err_hf = (g16[n].double() - want).norm().item()
        assert err <= 2 * err_hf + 1e-12, f"{n}: {err:.3g} vs transformers' {err_hf:.3g}"
    ulp = 2.0 ** (torch.frexp(out64.loss).exponent.item() - 8)
    assert abs(out.loss.item() - out64.loss.item()) <= ulp / 2 + abs(out16.loss.item() - out64.loss.item())
