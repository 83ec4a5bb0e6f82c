"""One-line Hugging Face ``transformers`` integration: the causal-LM loss without the logits.

    from fastreg.integrations import transformers as fastreg_hf
    model = fastreg_hf.apply(AutoModelForCausalLM.from_pretrained(...))
    loss = model(input_ids, labels=labels).loss          # or hand the model to Trainer

How the data flows in a patched model's forward when labels are given:

    model.forward(input_ids, labels=..., **kwargs)       # the patch (installed on the instance)
      -> the model's own forward, called WITHOUT labels  # every model-specific input still works
           base model -> final hidden states (B, T, D)
           lm_head(hidden)                               # the patched head stores `hidden` and returns
                                                         # an empty (B, T, 0) tensor: no logits
      -> fastreg.linear_cross_entropy(hidden, lm_head.weight, labels, shift=True, softcap=...)
      <- the model's output with .loss set and .logits None

Without labels the model runs unchanged (logits as usual, e.g. for ``generate``); so it does with
labels under ``torch.no_grad()`` (``Trainer.evaluate``/``predict`` want the logits for metrics)
unless ``apply(..., eval_logits=False)``. The loss is
the one transformers computes (``ForCausalLMLoss``): labels shifted left by one, ``-100`` (or
``ignore_index``) ignored, ``shift_labels`` honoured, mean over the non-ignored tokens or, when
Trainer passes ``num_items_in_batch`` (gradient accumulation), their sum divided by it. Tied
input/output embeddings need nothing special: the head's weight *is* the embedding's parameter,
so its gradient accumulates both uses. Gemma 2/3's final-logit softcap becomes fastreg's
``softcap``. Extra fastreg options: ``z_loss``, ``label_smoothing``, ``chunk_size``.
In bf16/fp16 the loss value is fastreg's, in the input dtype (transformers reports it in fp32);
the gradients come from fastreg's fp32 row pass and are as accurate as transformers' own.

To also use fastreg's fused AdamW in ``Trainer`` (two lines)::

    opt = fastreg.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None))
"""
from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import transformers  # noqa: F401
except ImportError as e:
    raise ImportError("fastreg.integrations.transformers needs Hugging Face transformers: "
                      "pip install fastreg[transformers]  (or: pip install transformers accelerate)") from e

from ..functional import linear_cross_entropy

__all__ = ["apply", "revert", "is_applied", "SUPPORTED_MODELS"]

# Causal-LM classes whose forward is "hidden = base(...); logits = lm_head(hidden) [softcap];
# loss = loss_function(logits, labels, ...)", checked against the installed transformers by the
# tests. Value: the config attribute holding the final-logit softcap, if the model has one.
SUPPORTED_MODELS = {
    "LlamaForCausalLM": None,
    "MistralForCausalLM": None,
    "Qwen2ForCausalLM": None,
    "Qwen3ForCausalLM": None,
    "GemmaForCausalLM": None,
    "Gemma2ForCausalLM": "final_logit_softcapping",
    "Gemma3ForCausalLM": "final_logit_softcapping",
    "Phi3ForCausalLM": None,
    "GPT2LMHeadModel": None,
}


class _Options:
    """What ``apply`` was asked for, kept on the model (``model._fastreg_lce``)."""

    def __init__(self, softcap_attr, z_loss, label_smoothing, chunk_size, eval_logits):
        self.softcap_attr = softcap_attr
        self.eval_logits = bool(eval_logits)
        self.z_loss = float(z_loss)
        self.label_smoothing = float(label_smoothing)
        self.chunk_size = chunk_size


def _supported_class(model: nn.Module) -> Optional[str]:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODELS and cls.__module__.startswith("transformers."):
            return cls.__name__
    return None


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` has patched ``model``."""
    return "_fastreg_lce" in model.__dict__


def apply(
    model: nn.Module,
    *,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
    chunk_size: Optional[int] = None,
    eval_logits: bool = True,
) -> nn.Module:
    """Patch a transformers causal LM in place (and return it) so that ``model(..., labels=...)``
    computes its loss with :func:`fastreg.linear_cross_entropy` from the final hidden states and
    the LM-head weight, never materialising the logits (``output.logits`` is then ``None``).

    Args:
        model: an instance of one of :data:`SUPPORTED_MODELS` (or a subclass).
        z_loss: adds ``z_loss * logsumexp(logits)**2`` per token (PaLM's z-loss); 0 = the plain loss.
        label_smoothing: as in ``F.cross_entropy``; 0 = the plain loss.
        chunk_size: rows of logits computed at a time (default: fastreg's memory budget).
        eval_logits: with labels but gradients disabled (``torch.no_grad()``, as in
            ``Trainer.evaluate``), run the model unchanged so its logits are there for metrics;
            ``False``: the fused loss and ``logits=None`` there too (only the loss is needed).

    Calling it again replaces the options; :func:`revert` undoes it.
    """
    name = _supported_class(model)
    if name is None:
        raise TypeError(f"fastreg.integrations.transformers.apply: {type(model).__name__} is not supported; "
                        f"supported causal-LM classes: {', '.join(SUPPORTED_MODELS)}")
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(f"fastreg.integrations.transformers.apply: the model's output layer must be a plain "
                        f"torch.nn.Linear (got {type(head).__name__}; e.g. a PEFT/quantised head is not supported)")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fastreg.integrations.transformers.apply: label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"fastreg.integrations.transformers.apply: z_loss must be >= 0, got {z_loss}")
    options = _Options(SUPPORTED_MODELS[name], z_loss, label_smoothing, chunk_size, eval_logits)
    if not is_applied(model):
        # Bound methods (not closures), so copy.deepcopy(model) re-binds them to the copy.
        model._fastreg_original_forward = model.forward
        model.forward = types.MethodType(_wrap_signature(_patched_forward, model.forward), model)
    model._fastreg_lce = options
    _patch_head(model, head)
    return model


def revert(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model computes its logits and loss as transformers does."""
    if is_applied(model):
        head = model._fastreg_head
        for attr in ("_fastreg_head_forward", "_fastreg_capture", "_fastreg_hidden"):
            head.__dict__.pop(attr, None)
        head.__dict__.pop("forward", None)
        model.__dict__.pop("forward", None)
        original = model.__dict__.pop("_fastreg_original_forward")
        if isinstance(original, types.MethodType) and original.__func__ is not type(model).forward:
            model.forward = original  # someone else's instance-level wrapper from before apply()
        for attr in ("_fastreg_lce", "_fastreg_head"):
            model.__dict__.pop(attr, None)
    return model


def _patch_head(model: nn.Module, head: nn.Linear) -> None:
    old = model.__dict__.get("_fastreg_head")
    if old is head:
        return
    if old is not None:  # the output layer was replaced since (e.g. resize_token_embeddings)
        old.__dict__.pop("forward", None)
    head._fastreg_capture = False
    head._fastreg_hidden = None
    head.forward = types.MethodType(_capturing_head_forward, head)
    # kept outside the module tree (a plain attribute would register it as a submodule twice)
    model.__dict__["_fastreg_head"] = head


def _capturing_head_forward(head: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    if head._fastreg_capture:
        head._fastreg_hidden = hidden
        return hidden.new_empty(hidden.shape[:-1] + (0,))  # what the model's forward sees as logits
    return F.linear(hidden, head.weight, head.bias)


def _wrap_signature(func, original):
    """``func`` showing ``original``'s signature, so Trainer's inspection (``**kwargs`` -> it passes
    ``num_items_in_batch``; column pruning by argument name) sees the model's real arguments."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return func(self, *args, **kwargs)
    sig = inspect.signature(original)  # of the bound method: without self
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    forward.__signature__ = sig.replace(parameters=[self_param, *sig.parameters.values()])
    return forward


def _patched_forward(model: nn.Module, *args, **kwargs):
    original = model._fastreg_original_forward
    signature = inspect.signature(original)
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for p in signature.parameters.values():
        if p.kind == inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(p.name, {}))
    labels = arguments.get("labels")
    if labels is None or (model._fastreg_lce.eval_logits and not torch.is_grad_enabled()):
        return original(**arguments)
    del arguments["labels"]

    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    head = model._fastreg_head
    if model.get_output_embeddings() is not head:
        _patch_head(model, model.get_output_embeddings())
        head = model._fastreg_head
    head._fastreg_capture, head._fastreg_hidden = True, None
    try:
        # The same forward, minus the loss: loss kwargs (num_items_in_batch, ...) still reach the
        # base model exactly as they would unpatched.
        output = original(**arguments, return_dict=True)
        hidden = head._fastreg_hidden
    finally:
        head._fastreg_capture, head._fastreg_hidden = False, None
    if hidden is None:
        raise RuntimeError(f"fastreg.integrations.transformers: {type(model).__name__}'s forward did not call "
                           f"its output layer; this transformers version is not supported by the patch")
    loss = causal_lm_loss(model, hidden, labels, **arguments)
    # a fresh output without the placeholder logits (ModelOutput keeps keys set to None)
    output = type(output)(**{**{k: v for k, v in output.items() if k != "logits"}, "loss": loss})
    return output if return_dict else output.to_tuple()


def causal_lm_loss(
    model: nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels: Optional[torch.Tensor] = None,
    **_unused,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` computed by fastreg from ``hidden`` (B, T, D)."""
    options: _Options = model._fastreg_lce
    head = model._fastreg_head
    shift = shift_labels is None  # fastreg shifts the labels itself (shift=True): position t scores label t + 1
    targets = labels if shift else shift_labels
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"fastreg.integrations.transformers: labels of shape {tuple(labels.shape)} do not match the "
                         f"hidden states {tuple(hidden.shape[:-1])} (logits_to_keep with labels is not supported)")
    weight = head.weight
    if hidden.dtype != weight.dtype:  # e.g. fp32 hidden states from autocast regions, bf16 weights
        hidden = hidden.to(weight.dtype)
    softcap = getattr(model.config, options.softcap_attr, None) if options.softcap_attr else None
    loss = linear_cross_entropy(
        hidden,
        weight,
        targets.to(hidden.device),
        shift=shift,
        linear_bias=head.bias,
        reduction="mean" if num_items_in_batch is None else "sum",
        ignore_index=ignore_index,
        label_smoothing=options.label_smoothing,
        softcap=softcap,
        z_loss=options.z_loss,
        chunk_size=options.chunk_size,
    ).float()  # transformers computes the loss in float32 too
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss
