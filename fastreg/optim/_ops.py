"""The fused optimizer operators (schemas in csrc/fastreg.cpp) and their fake implementations.

They mutate their tensor lists in place and return nothing, so the fake (meta / FakeTensor)
versions only have to check nothing and return None; this is what lets torch.compile trace them
and ``torch.library.opcheck`` run.
"""
import torch

from .. import _C_loader  # noqa: F401  (registers torch.ops.fastreg)

fused_sgd_ = torch.ops.fastreg._fused_sgd_.default
fused_adam_ = torch.ops.fastreg._fused_adam_.default


@torch.library.register_fake("fastreg::_fused_sgd_")
def _fused_sgd_fake(params, grads, momentum_buffers, momentum_started, lr, lr_tensor, momentum, dampening,
                    weight_decay, nesterov, maximize, grad_scale, found_inf, sr_seed=-1, sr_steps=None,
                    master_params=None) -> None:
    return None


@torch.library.register_fake("fastreg::_fused_adam_")
def _fused_adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1, beta2,
                     weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf, sr_seed=-1,
                     master_params=None) -> None:
    return None
