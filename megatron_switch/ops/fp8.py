"""FP8 expert GEMMs of the `torch` backend: per-tensor current scaling and `torch._scaled_mm`.

Formats (Megatron's --fp8-format): "e4m3" quantizes every GEMM operand to e4m3; "hybrid" keeps
activations and weights in e4m3 and gradients in e5m2 (wider range, less precision).
Scaling (--fp8-recipe tensorwise, "current scaling"): each operand gets its own scale from its own
amax at the moment it is quantized,
    scale = fp8_max / amax(x),   x_fp8 = fp8(x * scale),   x ~= x_fp8 * scale^-1,
and the GEMM receives the inverse scales, so y = (a_fp8 @ b_fp8^T) * scale_a^-1 * scale_b^-1 in
float32 accumulation, written in the activation dtype. Biases, activations, the router and the
combine stay in bf16/fp32.

All three GEMMs of a projection (forward, dgrad, wgrad) run in FP8. `_scaled_mm` wants the token
dimension to be a multiple of 16; rows are zero-padded to it (`FP8_MULTIPLE`) and cut afterwards,
which changes no result (zero rows do not move an amax). Backward keeps only the FP8 transposes
of the input and the weight (1 byte per element), which also halves the expert activations kept.
"""

from __future__ import annotations

import warnings
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


def _quantize(x: torch.Tensor, dtype: torch.dtype, per_expert: bool, transpose: bool):
    fp8_max = torch.finfo(dtype).max
    dims = tuple(range(1, x.dim())) if per_expert else None
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=dims).float()
    scale = torch.where(amax > 0, fp8_max / amax, torch.ones_like(amax))
    view = scale.view(-1, *[1] * (x.dim() - 1)) if per_expert else scale
    x_fp8 = (x * view).to(dtype)
    if transpose:
        return x_fp8, x_fp8.transpose(-1, -2).contiguous(), scale.reciprocal()
    return x_fp8, scale.reciprocal()


_COMPILED = {}


def quantize(x: torch.Tensor, dtype: torch.dtype, per_expert: bool = False, transpose: bool = False):
    """Current scaling: (x_fp8, scale_inv) with x ~= x_fp8.float() * scale_inv; with transpose also
    the FP8 copy of x transposed in its last two dimensions: (x_fp8, x_fp8_T, scale_inv).

    scale = fp8_max / amax(x) (1 when x is all zeros): one scale for the whole tensor, or with
    per_expert one per index of the leading dimension ([E, ...] -> scale_inv [E]). |x * scale| <=
    fp8_max by construction, so the cast never overflows. scale_inv is float32 on x's device.
    On CUDA the function is compiled (torch.compile), which fuses scaling, cast and transpose into
    passes that read x once; elsewhere, and if compilation is unavailable, it runs eagerly.
    """
    x = x.detach()  # plain tensors only: a Parameter or a grad-requiring input would recompile the kernels
    if not x.is_cuda:
        return _quantize(x, dtype, per_expert, transpose)
    compiled = _COMPILED.get("quantize")
    if compiled is None:
        compiled = _COMPILED["quantize"] = torch.compile(_quantize, dynamic=True)
    try:
        return compiled(x, dtype, per_expert, transpose)
    except Exception as err:  # an environment where Inductor cannot build kernels: stay correct, eager
        warnings.warn(f"FP8 quantization runs eagerly (torch.compile failed: {type(err).__name__}: {err})")
        _COMPILED["quantize"] = _quantize
        return _quantize(x, dtype, per_expert, transpose)


def dequantize(x_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (x_fp8.float() * scale_inv).to(dtype)


def scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
              out_dtype: torch.dtype, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T in FP8 -> [M, N] of out_dtype (into `out` if given); both operands
    row-major.

    `_scaled_mm` takes its second operand column-major, which `b.t()` of a row-major b is. The
    scales are passed as tensors of their own: cuBLASLt refuses a scale that is a view into a
    per-expert vector (CUBLAS_STATUS_NOT_SUPPORTED, seen on H200 with torch 2.11).
    """
    kwargs = {} if out is None else {"out": out}
    return torch._scaled_mm(a, b.t(), scale_a=a_inv.clone(), scale_b=b_inv.clone(), out_dtype=out_dtype,
                            **kwargs)


def _bank_mm(a_EMK: torch.Tensor, a_inv: torch.Tensor, b_ENK: torch.Tensor, b_inv: torch.Tensor,
             out_dtype: torch.dtype) -> torch.Tensor:
    """[E, M, K] x [E, N, K] -> [E, M, N]: one FP8 GEMM per expert, written in place."""
    out = torch.empty(a_EMK.shape[0], a_EMK.shape[1], b_ENK.shape[1], dtype=out_dtype, device=a_EMK.device)
    for e in range(a_EMK.shape[0]):
        scaled_mm(a_EMK[e], a_inv[e], b_ENK[e], b_inv[e], out_dtype, out=out[e])
    return out


def _pad_tokens(x_ENi: torch.Tensor) -> torch.Tensor:
    """Zero token rows up to a multiple of 16 (at least 16: an expert with no token still runs)."""
    rows = x_ENi.shape[1]
    pad = max(FP8_MULTIPLE, -(-rows // FP8_MULTIPLE) * FP8_MULTIPLE) - rows
    return F.pad(x_ENi, (0, 0, 0, pad)) if pad else x_ENi


class Fp8BankProjection(torch.autograd.Function):
    """y[e] = x[e] @ w[e]^T (+ b[e]) for every expert e, forward, dgrad and wgrad GEMMs in FP8.

    Shapes: x [E, N, in], w [E, out, in], b [E, out] or None -> y [E, N, out] in x's dtype; in and
    out must be multiples of 16 (checked at startup), N is padded here. Each expert's operands get
    their own scale (quantized for all experts in one pass); one `_scaled_mm` per expert and GEMM.
    The weight gradient comes back in w's dtype (Megatron's DDP adds it to main_grad as usual).
    """

    @staticmethod
    def forward(ctx, x_ENi, w_Eoi, b_Eo, fp8_format: str):
        fwd_dtype, grad_dtype = fp8_dtypes(fp8_format)
        rows = x_ENi.shape[1]
        # Each operand is quantized once with its transpose, which the backward GEMMs take
        # (Hopper's FP8 GEMMs accept only the "TN" layout): only the transposes are kept.
        x_q, x_qT, x_inv = quantize(_pad_tokens(x_ENi), fwd_dtype, per_expert=True, transpose=True)
        w_q, w_qT, w_inv = quantize(w_Eoi, fwd_dtype, per_expert=True, transpose=True)
        y = _bank_mm(x_q, x_inv, w_q, w_inv, x_ENi.dtype)[:, :rows]
        if b_Eo is not None:
            y = y + b_Eo[:, None, :].to(y.dtype)
        ctx.save_for_backward(x_qT, x_inv, w_qT, w_inv)
        ctx.rows, ctx.grad_dtype, ctx.has_bias = rows, grad_dtype, b_Eo is not None
        ctx.x_dtype, ctx.w_dtype = x_ENi.dtype, w_Eoi.dtype
        return y

    @staticmethod
    def backward(ctx, dy_ENo):
        x_qT, x_inv, w_qT, w_inv = ctx.saved_tensors
        dy_q, dy_qT, dy_inv = quantize(_pad_tokens(dy_ENo), ctx.grad_dtype, per_expert=True, transpose=True)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _bank_mm(dy_q, dy_inv, w_qT, w_inv, ctx.x_dtype)[:, :ctx.rows]  # dy [N, out] @ w [out, in]
        if ctx.needs_input_grad[1]:
            dw = _bank_mm(dy_qT, dy_inv, x_qT, x_inv, ctx.w_dtype)  # dy^T [out, N] @ x [N, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_ENo.sum(1)
        return dx, dw, db, None


def fp8_bank_linear(x_ENi: torch.Tensor, w_Eoi: torch.Tensor, b_Eo: Optional[torch.Tensor],
                    fp8_format: str) -> torch.Tensor:
    return Fp8BankProjection.apply(x_ENi, w_Eoi, b_Eo, fp8_format)


def fp8_linear(x_Ni: torch.Tensor, w_oi: torch.Tensor, b_o: Optional[torch.Tensor],
               fp8_format: str) -> torch.Tensor:
    """One expert: [N, in] x [out, in] -> [N, out] (the bank projection with E = 1)."""
    return fp8_bank_linear(x_Ni[None], w_oi[None], None if b_o is None else b_o[None], fp8_format)[0]
