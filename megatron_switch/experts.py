"""Expert banks: E_l local experts, each a two-layer FFN, computed in one batched GEMM per projection.

Weights are stacked per expert in the nn.Linear layout ([out, in]), so expert i of the bank is
`linear_fc1.weight = weight1[i]`, `linear_fc2.weight = weight2[i]` of a Megatron MLP:
  weight1 [E_l, f', h] (f' = 2f for gated activations, [gate; up] halves as in Megatron),
  weight2 [E_l, h, f], bias1 [E_l, f'], bias2 [E_l, h].
Two entry points: `forward_padded` for fixed capacity ([E_l, N, h], one bmm per projection) and
`forward_grouped` for variable token counts per expert (dropless).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig
from megatron_switch.initialization import seeded_generator, truncated_normal_

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "geglu": F.gelu, "swiglu": F.silu}


def _wgrad_placeholder(weight: torch.Tensor):
    """What backward returns for a weight whose gradient went into `main_grad` (Megatron's contract)."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # never written


class _BankProjection(torch.autograd.Function):
    """y[e] = x[e] @ w[e]^T (+ b[e]) for every expert e of a bank.

    Shapes: x [E, N, in], w [E, out, in], b [E, out] or None -> y [E, N, out].
    The bias is fused into the GEMM (baddbmm). The weight gradient is produced in the weight's own
    [E, out, in] layout (autograd's bmm backward yields a transposed view that costs a copy of the
    whole bank), or, with gradient-accumulation fusion and a `main_grad` buffer (Megatron's DDP),
    accumulated straight into it, so no bank-sized gradient is allocated per step.
    """

    @staticmethod
    def forward(ctx, x_ENi, w_Eoi, b_Eo, fuse_wgrad):
        ctx.save_for_backward(x_ENi, w_Eoi)
        ctx.has_bias, ctx.fuse_wgrad = b_Eo is not None, fuse_wgrad
        if b_Eo is None:
            return torch.bmm(x_ENi, w_Eoi.transpose(1, 2))
        return torch.baddbmm(b_Eo[:, None, :], x_ENi, w_Eoi.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy_ENo):
        x_ENi, w_Eoi = ctx.saved_tensors
        dx = torch.bmm(dy_ENo, w_Eoi) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            main_grad = getattr(w_Eoi, "main_grad", None) if ctx.fuse_wgrad else None
            if main_grad is None:
                dw = torch.bmm(dy_ENo.transpose(1, 2), x_ENi, out=torch.empty_like(w_Eoi))
            else:
                if main_grad.dtype == dy_ENo.dtype:
                    main_grad.baddbmm_(dy_ENo.transpose(1, 2), x_ENi)
                else:
                    main_grad.add_(torch.bmm(dy_ENo.transpose(1, 2), x_ENi))
                dw = _wgrad_placeholder(w_Eoi)
        db = dy_ENo.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None


def expert_ffn_size(config: TransformerConfig, switch: SwitchConfig) -> int:
    return switch.expert_ffn_hidden_size or config.ffn_hidden_size


class TorchExperts(MegatronModule):
    """The `torch` expert backend: bf16/fp32 batched GEMMs on any device."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int, layer_number: int = 1):
        super().__init__(config=config)
        self.switch = switch
        self.num_local_experts = num_local_experts
        self.first_expert = first_expert
        ffn = expert_ffn_size(config, switch)
        fc1_out = 2 * ffn if switch.gated else ffn
        hidden, dtype = config.hidden_size, config.params_dtype
        self.weight1 = torch.nn.Parameter(torch.empty(num_local_experts, fc1_out, hidden, dtype=dtype))
        self.weight2 = torch.nn.Parameter(torch.empty(num_local_experts, hidden, ffn, dtype=dtype))
        if switch.expert_bias:
            self.bias1 = torch.nn.Parameter(torch.zeros(num_local_experts, fc1_out, dtype=dtype))
            self.bias2 = torch.nn.Parameter(torch.zeros(num_local_experts, hidden, dtype=dtype))
        else:
            self.bias1 = self.bias2 = None
        for param in self.parameters():
            param.allreduce = False  # Megatron DDP: reduce over the expert-data-parallel group
        self.activation = _ACTIVATIONS[switch.activation]
        self.reset_parameters(layer_number)

    def reset_parameters(self, layer_number: int) -> None:
        """Expert e of layer L draws the same weights whatever the parallel layout."""
        if not self.config.perform_initialization:
            return
        for tensor_id, weight in ((1, self.weight1), (2, self.weight2)):
            for local in range(self.num_local_experts):
                generator = seeded_generator(self.switch.init_seed, layer_number, tensor_id,
                                             self.first_expert + local)
                truncated_normal_(weight[local], self.switch.init_scale, generator=generator)

    def _ffn_tail(self, h: torch.Tensor) -> torch.Tensor:
        if self.switch.gated:
            gate, up = torch.chunk(h, 2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return F.dropout(h, p=self.switch.expert_dropout, training=self.training)

    def forward_padded(self, x_ENh: torch.Tensor) -> torch.Tensor:
        """[E_l, N, h] -> [E_l, N, h]: every expert gets the same number N of token slots."""
        fuse = self.config.gradient_accumulation_fusion
        h = _BankProjection.apply(x_ENh, self.weight1, self.bias1, fuse)
        return _BankProjection.apply(self._ffn_tail(h), self.weight2, self.bias2, fuse)

    def forward_grouped(self, x_Nh: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        """[N, h] sorted by local expert, with counts per expert -> [N, h]."""
        outputs = []
        # Empty groups run too: every expert stays in the autograd graph on every rank, so each
        # rank's backward issues the same collectives even when its experts received no token.
        for e, x_nh in enumerate(torch.split(x_Nh, tokens_per_expert)):
            h = F.linear(x_nh, self.weight1[e], None if self.bias1 is None else self.bias1[e])
            outputs.append(F.linear(self._ffn_tail(h), self.weight2[e],
                                    None if self.bias2 is None else self.bias2[e]))
        return torch.cat(outputs) if outputs else x_Nh
