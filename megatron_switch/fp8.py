"""FP8 expert GEMMs of the `torch` backend: per-tensor current scaling and `torch._scaled_mm`.

Formats (Megatron's --fp8-format): "e4m3" quantizes every GEMM operand to e4m3; "hybrid" keeps
activations and weights in e4m3 and gradients in e5m2 (wider range, less precision).
Scaling (--fp8-recipe tensorwise, "current scaling"): each operand gets its own scale from its own
amax at the moment it is quantized,
    scale = fp8_max / amax(x),   x_fp8 = saturate(x * scale),   x ~= x_fp8 * scale^-1,
and the GEMM receives the inverse scales, so y = (a_fp8 @ b_fp8^T) * scale_a^-1 * scale_b^-1 in
float32 accumulation, written in the activation dtype. Biases, activations, the router and the
combine stay in bf16/fp32.

All three GEMMs of a projection (forward, dgrad, wgrad) run in FP8. `_scaled_mm` wants the token
dimension to be a multiple of 16; rows are zero-padded to it (`FP8_MULTIPLE`) and cut afterwards,
which changes no result (zero rows do not move an amax). The input is saved for backward in FP8
(1 byte per element), which also halves the expert activations kept for backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

FP8_MULTIPLE = 16
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def fp8_dtypes(fp8_format: str) -> Tuple[torch.dtype, torch.dtype]:
    """(forward operand dtype, gradient dtype) of a Megatron FP8 format name."""
    if fp8_format == "e4m3":
        return E4M3, E4M3
    if fp8_format == "hybrid":
        return E4M3, E5M2
    raise ValueError(f"unknown FP8 format {fp8_format!r}: use e4m3 or hybrid")


def quantize(x: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor current scaling: (x_fp8, scale_inv) with x ~= x_fp8.float() * scale_inv.

    scale = fp8_max / amax(x) (1 when x is all zeros); values are saturated to +-fp8_max.
    scale_inv is a float32 scalar tensor on x's device.
    """
    fp8_max = torch.finfo(dtype).max
    amax = x.detach().abs().amax().float()
    scale = torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))
    x_fp8 = (x.float() * scale).clamp_(-fp8_max, fp8_max).to(dtype)
    return x_fp8, scale.reciprocal()


def dequantize(x_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() * scale_inv).to(dtype)


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in FP8 -> [M, N] of out_dtype; both operands row-major.

    `_scaled_mm` takes its second operand column-major, which `b.t()` of a row-major b is.
    """
    return torch._scaled_mm(a, b.t(), scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


def _pad_rows(x: torch.Tensor) -> torch.Tensor:
    """Zero rows up to a multiple of 16 (at least 16: an expert with no token still runs)."""
    pad = max(FP8_MULTIPLE, -(-x.shape[0] // FP8_MULTIPLE) * FP8_MULTIPLE) - x.shape[0]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


class Fp8Projection(torch.autograd.Function):
    """y = x @ w^T (+ b) with the forward, dgrad and wgrad GEMMs in FP8 (one expert).

    Shapes: x [N, in], w [out, in], b [out] or None -> y [N, out] in x's dtype; in and out must be
    multiples of 16 (checked at startup), N is padded here. The weight gradient comes back in w's
    dtype (Megatron's DDP adds it to its main_grad buffer like any other gradient).
    """

    @staticmethod
    def forward(ctx, x_Ni, w_oi, b_o, fp8_format: str):
        fwd_dtype, grad_dtype = fp8_dtypes(fp8_format)
        rows = x_Ni.shape[0]
        x_q, x_inv = quantize(_pad_rows(x_Ni), fwd_dtype)
        w_q, w_inv = quantize(w_oi, fwd_dtype)
        y = scaled_mm(x_q, x_inv, w_q, w_inv, x_Ni.dtype)[:rows]
        if b_o is not None:
            y = y + b_o.to(y.dtype)
        ctx.save_for_backward(x_q, x_inv, w_q, w_inv)
        ctx.rows, ctx.grad_dtype, ctx.has_bias = rows, grad_dtype, b_o is not None
        ctx.x_dtype, ctx.w_dtype = x_Ni.dtype, w_oi.dtype
        return y

    @staticmethod
    def backward(ctx, dy_No):
        x_q, x_inv, w_q, w_inv = ctx.saved_tensors
        dy_q, dy_inv = quantize(_pad_rows(dy_No), ctx.grad_dtype)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx [N, in] = dy [N, out] @ w [out, in]
            dx = scaled_mm(dy_q, dy_inv, w_q.t().contiguous(), w_inv, ctx.x_dtype)[:ctx.rows]
        if ctx.needs_input_grad[1]:
            # dw [out, in] = dy^T [out, N] @ x [N, in]
            dw = scaled_mm(dy_q.t().contiguous(), dy_inv, x_q.t().contiguous(), x_inv, ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_No.sum(0)
        return dx, dw, db, None


def fp8_linear(x_Ni: torch.Tensor, w_oi: torch.Tensor, b_o: Optional[torch.Tensor],
               fp8_format: str) -> torch.Tensor:
    return Fp8Projection.apply(x_Ni, w_oi, b_o, fp8_format)
