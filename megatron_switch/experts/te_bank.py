"""The `te` expert backend: Transformer Engine's GroupedLinear, bf16 or FP8, behind the bank interface.

Imported only when `--switch-expert-backend te` is asked for (CUDA and Transformer Engine present).
`TEExperts` keeps the bank contract (`experts.base`): the same checkpoint keys and global shapes in
sharded (torch_dist) checkpoints (one block per expert), and the stacked names (weight1 [E_l, f', h],
weight2 [E_l, h, f], bias1, bias2) in plain state dicts, so a checkpoint written by one backend loads
into the other; `expert_weights` / `load_expert_weights` read and write the per-expert parameters
themselves. Transformer
Engine's own FP8 metadata (`_extra_state`: delayed-scaling amax history) is not checkpointed; it
restarts after a load. This backend has not been run: Transformer Engine could not be installed on
any machine the project is tested on.

FP8 runs only inside the expert bank (`fp8_autocast` around the two GroupedLinear calls); token
counts are padded to TE's FP8 multiple with TE's Fp8Padding/Fp8Unpadding. The router and the
combine are outside, in float32/bf16.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_switch.config import SwitchConfig, SwitchConfigError
from megatron_switch.experts.base import CHECKPOINT_KEYS, ExpertBank

# --fp8-recipe -> (Transformer Engine class in transformer_engine.common.recipe, minimum TE version,
# minimum compute capability), as megatron-core's fp8_utils gates them.
TE_RECIPES = {
    "delayed": ("DelayedScaling", "1.0", (8, 9)),
    "tensorwise": ("Float8CurrentScaling", "2.2.0.dev0", (8, 9)),
    "blockwise": ("Float8BlockScaling", "2.3.0.dev0", (9, 0)),
    "mxfp8": ("MXFP8BlockScaling", "2.1.0", (10, 0)),
}


def te_fp8_recipe(fp8_format: str, fp8_recipe: str):
    """The Transformer Engine recipe object for Megatron's --fp8-format/--fp8-recipe names, or
    SwitchConfigError when this TE version or GPU cannot run it."""
    from megatron.core.utils import get_te_version, is_te_min_version
    from transformer_engine.common import recipe as te_recipe

    class_name, min_version, capability = TE_RECIPES[fp8_recipe]
    if not is_te_min_version(min_version):
        raise SwitchConfigError(
            f"--fp8-recipe {fp8_recipe} needs Transformer Engine >= {min_version}; this is {get_te_version()}. "
            "Upgrade Transformer Engine or use --fp8-recipe delayed.")
    if torch.cuda.get_device_capability() < capability:
        raise SwitchConfigError(
            f"--fp8-recipe {fp8_recipe} needs a GPU of compute capability {capability[0]}.{capability[1]}+, "
            f"{torch.cuda.get_device_name()} is {'.'.join(map(str, torch.cuda.get_device_capability()))}.")
    fmt = te_recipe.Format.HYBRID if fp8_format == "hybrid" else te_recipe.Format.E4M3
    return getattr(te_recipe, class_name)(fp8_format=fmt)


class TEExperts(ExpertBank):
    """E_l experts as two Transformer Engine GroupedLinear layers (one GEMM per local expert)."""

    STACKED = {"weight1": ("fc1", "weight"), "bias1": ("fc1", "bias"),
               "weight2": ("fc2", "weight"), "bias2": ("fc2", "bias")}

    def __init__(self, config: TransformerConfig, switch: SwitchConfig, num_local_experts: int,
                 first_expert: int, layer_number: int = 1):
        import transformer_engine.pytorch as te

        super().__init__(config, switch, num_local_experts, first_expert)
        ffn, fc1_out = self.ffn, self.fc1_out
        common = dict(bias=switch.expert_bias, params_dtype=config.params_dtype,
                      device=torch.cuda.current_device(),
                      fuse_wgrad_accumulation=config.gradient_accumulation_fusion)
        self.fc1 = te.GroupedLinear(num_local_experts, config.hidden_size, fc1_out, **common)
        self.fc2 = te.GroupedLinear(num_local_experts, ffn, config.hidden_size, **common)
        for param in self.parameters():
            param.allreduce = False  # Megatron DDP: reduce over the expert-data-parallel group
        self.fp8_recipe = (te_fp8_recipe(switch.fp8_format, switch.fp8_recipe or "delayed")
                           if switch.fp8_format else None)
        if self.fp8_recipe is not None:
            self.pad, self.unpad = te.Fp8Padding(num_local_experts), te.Fp8Unpadding(num_local_experts)
        self._register_state_dict_hook(TEExperts._stack_state)
        self._register_load_state_dict_pre_hook(TEExperts._split_state, with_module=True)
        self.reset_parameters(layer_number)

    def _per_expert(self, name: str) -> List[torch.Tensor]:
        module, kind = self.STACKED[name]
        if kind == "bias" and not self.switch.expert_bias:
            return []
        return [getattr(getattr(self, module), f"{kind}{e}") for e in range(self.num_local_experts)]

    def reset_parameters(self, layer_number: int) -> None:
        """The same layout-independent draws as TorchExperts (expert e of layer L, any layout)."""
        if not self.config.perform_initialization:
            return
        for tensor_id, name in ((1, "weight1"), (2, "weight2")):
            for local, weight in enumerate(self._per_expert(name)):
                self.draw(weight, layer_number, tensor_id, local)
        with torch.no_grad():
            for bias in self._per_expert("bias1") + self._per_expert("bias2"):
                bias.zero_()

    def _expert_parameters(self, local: int) -> Dict[str, torch.nn.Parameter]:
        return {name: params[local] for name in CHECKPOINT_KEYS if (params := self._per_expert(name))}

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), ep_rank: int = 0, ep_size: int = 1,
                           replica_id=(0, 0, 0)) -> dict:
        """One [1, ...] block per expert parameter at its global expert index (the parameters
        themselves are saved and loaded, so the optimizer state maps onto them by identity)."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        axis, num_experts = len(sharded_offsets), self.num_local_experts * ep_size
        state = {}
        for name, key in CHECKPOINT_KEYS.items():
            module, kind = self.STACKED[name]
            for local, param in enumerate(self._per_expert(name)):
                state[f"{prefix}{module}.{kind}{local}"] = ShardedTensor.from_rank_offsets(
                    f"{prefix}{key}", param, *sharded_offsets, (axis, self.first_expert + local, num_experts),
                    replica_id=replica_id, prepend_axis_num=axis + 1)
        return state

    @staticmethod
    def _stack_state(module, state_dict, prefix, local_metadata):
        for name, (child, kind) in TEExperts.STACKED.items():
            keys = [f"{prefix}{child}.{kind}{e}" for e in range(module.num_local_experts)]
            if keys[0] in state_dict:
                state_dict[prefix + name] = torch.stack([state_dict.pop(k) for k in keys])
        for child in ("fc1", "fc2"):
            state_dict.pop(f"{prefix}{child}._extra_state", None)
        return state_dict

    def _split_state(self, state_dict, prefix, *args):
        for name, (child, kind) in self.STACKED.items():
            stacked = state_dict.pop(prefix + name, None)
            if stacked is not None:
                for e, tensor in enumerate(stacked.unbind(0)):
                    state_dict[f"{prefix}{child}.{kind}{e}"] = tensor
        for child in ("fc1", "fc2"):
            state_dict.setdefault(f"{prefix}{child}._extra_state", None)

    def _run(self, x_Nh: torch.Tensor, tokens_per_expert: List[int]) -> torch.Tensor:
        import transformer_engine.pytorch as te

        if self.fp8_recipe is None:
            h = self.fc1(x_Nh, tokens_per_expert)
            return self.fc2(self._ffn_tail(h), tokens_per_expert)
        x_Nh, padded = self.pad(x_Nh, tokens_per_expert)
        with te.fp8_autocast(enabled=True, fp8_recipe=self.fp8_recipe):
            h = self.fc1(x_Nh, padded)
        h = self._ffn_tail(h)  # activation outside FP8, as TorchExperts
        with te.fp8_autocast(enabled=True, fp8_recipe=self.fp8_recipe):
            y = self.fc2(h, padded)
        return self.unpad(y, tokens_per_expert)

    def forward(self, x: torch.Tensor, tokens_per_expert: Optional[List[int]] = None) -> torch.Tensor:
        if tokens_per_expert is None:  # padded [E_l, N, h]
            experts, n, h = x.shape
            return self._run(x.reshape(experts * n, h), [n] * experts).view(experts, n, h)
        return self._run(x, list(tokens_per_expert))
