"""Autograd operations of the Switch layer, each device-agnostic (CPU/gloo and GPU/NCCL):

- `collectives`: all-to-all, gather/scatter of rows, sums over a group, each taking its device from
  its input (megatron-core's own mappings allocate on the current CUDA device);
- `projections`: the expert banks' projections, batched over padded slots or grouped over kept
  tokens (`torch._grouped_mm` where a probe shows it runs and multiplies correctly), with weight
  gradients accumulated into Megatron's `main_grad`;
- `fp8`: FP8 quantisation and `torch._scaled_mm` projections (GPUs of compute capability 8.9+).
"""
