"""The paper's initialisation (sec. 2.4): truncated normal, mean 0, sigma = sqrt(s / fan_in), cut at 2 sigma.

`switch_init_method(s)` is a Megatron `init_method` (weights laid out [out, in], as in
`torch.nn.Linear` and Megatron's linear layers), usable model-wide through
`TransformerConfig(init_method=..., output_layer_init_method=...)`.
`seeded_generator` gives the Switch layer an initialisation that does not depend on the
parallel layout: expert e of layer L draws the same numbers on any TP/PP/EP.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch


def truncated_normal_(
    tensor: torch.Tensor, scale: float, fan_in: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Fill `tensor` in place from N(0, sigma^2) truncated to [-2 sigma, 2 sigma].

    sigma = sqrt(scale / fan_in); fan_in defaults to tensor.shape[-1] ([..., out, in] layout).
    Draws in float32 on the CPU (so the numbers do not depend on the device or dtype), then copies.
    """
    fan_in = tensor.shape[-1] if fan_in is None else fan_in
    sigma = math.sqrt(scale / fan_in)
    values = torch.empty(tensor.shape, dtype=torch.float32)
    torch.nn.init.trunc_normal_(values, 0.0, sigma, -2 * sigma, 2 * sigma, generator=generator)
    with torch.no_grad():
        tensor.copy_(values)
    return tensor


def switch_init_method(scale: float = 0.1) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Megatron init_method drawing from the paper's truncated normal with scale s."""

    def init_(weight: torch.Tensor) -> torch.Tensor:
        return truncated_normal_(weight, scale)

    init_.__qualname__ = f"switch_init_method(scale={scale})"
    return init_


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (base seed, layer, expert, tensor id)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)
