"""The `torch` expert backend: the bank as stacked parameters, one batched or grouped GEMM per projection.

  weight1 [E_l, f', h], weight2 [E_l, h, f], bias1 [E_l, f'], bias2 [E_l, h]
Padded input runs one bmm per projection (`ops.projections.BankProjection`; a ReLU bank both in one
node, `BankReluFFN`, with the activation in place). Grouped input, on CPUs
by default (`SwitchConfig.grouped_gemm` None), runs as a batch padded to the largest group
(`ops.projections.batched_slots`) through the same bmm when that pads by at most 30%: one batched GEMM
is up to ~3x faster per row there than a GEMM per small group. Otherwise one `torch._grouped_mm` per
projection where the config allows it and the probe passes, else a GEMM per expert (`GroupedProjection`).
bf16/fp32 anywhere; FP8 through `torch._scaled_mm` on GPUs of compute
capability 8.9+ (`ops.fp8`).
"""

from __future__ import annotations

import functools
from typing import Dict, List, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig
from megatron_switch.experts.base import CHECKPOINT_KEYS, ExpertBank
from megatron_switch.ops.fp8 import fp8_bank_linear, fp8_linear
from megatron_switch.ops.projections import (BankProjection, BankReluFFN, GroupedProjection, batched_slots,
                                             rows_to_slots, slots_to_rows)


class TorchExperts(ExpertBank):
    """E_l experts as four stacked parameters (see the module docstring)."""

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int, layer_number: int = 1):
        super().__init__(config, switch, num_local_experts, first_expert)
        ffn, fc1_out = self.ffn, self.fc1_out
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
        self.reset_parameters(layer_number)

    def reset_parameters(self, layer_number: int) -> None:
        """Expert e of layer L draws the same weights whatever the parallel layout."""
        if not self.config.perform_initialization:
            return
        for tensor_id, weight in ((1, self.weight1), (2, self.weight2)):
            for local in range(self.num_local_experts):
                self.draw(weight[local], layer_number, tensor_id, local)

    def _expert_parameters(self, local: int) -> Dict[str, torch.Tensor]:
        return {name: getattr(self, name)[local] for name in CHECKPOINT_KEYS if getattr(self, name) is not None}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), ep_rank: int = 0, ep_size: int = 1,
                           replica_id=(0, 0, 0)) -> dict:
        """One [E_l, ...] block per tensor of the [E, ...] checkpoint tensor (dict keys: the bank's
        own parameter names, so a loaded dict goes straight into load_state_dict)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        axis = len(sharded_offsets)
        return {f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                    f"{prefix}{key}", getattr(self, name), *sharded_offsets, (axis, ep_rank, ep_size),
                    replica_id=replica_id, prepend_axis_num=axis)
                for name, key in CHECKPOINT_KEYS.items() if getattr(self, name) is not None}

    def _uses_grouped_mm(self, x: torch.Tensor) -> bool:
        return self.switch.uses_grouped_gemm(x.device.type)

    def _fp8_expert(self, x_nh: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e of the bank on its tokens [n, h] -> [n, h], its GEMMs in FP8."""
        linear = functools.partial(fp8_linear, fp8_format=self.switch.fp8_format)
        h = linear(x_nh, self.weight1[e], None if self.bias1 is None else self.bias1[e])
        return linear(self._ffn_tail(h), self.weight2[e], None if self.bias2 is None else self.bias2[e])

    def _fused_relu(self) -> bool:
        """Whether the padded bank runs as one `BankReluFFN` node: ReLU (never gated), no FP8, no expert
        dropout in this mode (the node has no dropout between its projections)."""
        switch = self.switch
        return (switch.activation == "relu" and not switch.fp8_format
                and not (switch.expert_dropout and self.training))

    def _project(self, x_ENi: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        """One projection of the whole bank: FP8 GEMMs when fp8_format is set, else batched GEMMs."""
        if self.switch.fp8_format:
            return fp8_bank_linear(x_ENi, weight, bias, self.switch.fp8_format)
        return BankProjection.apply(x_ENi, weight, bias, self.config.gradient_accumulation_fusion)

    def forward(self, x: torch.Tensor, tokens_per_expert: Optional[List[int]] = None) -> torch.Tensor:
        if tokens_per_expert is None:  # padded [E_l, N, h]
            if self._fused_relu():
                return BankReluFFN.apply(x, self.weight1, self.bias1, self.weight2, self.bias2,
                                         self.config.gradient_accumulation_fusion)
            h = self._project(x, self.weight1, self.bias1)
            return self._project(self._ffn_tail(h), self.weight2, self.bias2)
        # Grouped [N, h]. Empty groups run too: every expert stays in the autograd graph on every rank,
        # so each rank's backward issues the same collectives even when its experts received no token.
        if self.switch.fp8_format:
            outputs = [self._fp8_expert(x_nh, e) for e, x_nh in enumerate(torch.split(x, tokens_per_expert))]
            return torch.cat(outputs) if outputs else x
        if self.switch.grouped_gemm is None and x.device.type == "cpu":
            slot_N = batched_slots(tokens_per_expert, x.device)
            if slot_N is not None:  # the grouped rows as a batch [E_l, m, h]: the padded path's GEMMs
                x_Emh = rows_to_slots(x, slot_N, len(tokens_per_expert), max(tokens_per_expert))
                return slots_to_rows(self.forward(x_Emh), slot_N)
        fuse, kernel = self.config.gradient_accumulation_fusion, self._uses_grouped_mm(x)
        h = GroupedProjection.apply(x, self.weight1, self.bias1, tokens_per_expert, fuse, kernel)
        return GroupedProjection.apply(self._ffn_tail(h), self.weight2, self.bias2, tokens_per_expert, fuse, kernel)
