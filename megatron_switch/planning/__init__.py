"""Planning: parameter / FLOP / memory model, layout search over TP/PP/EP/DP, named presets, and
the sbatch scripts built from them (`megatron-switch plan`, `megatron-switch sbatch`)."""
