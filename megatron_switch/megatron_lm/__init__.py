"""Running Switch models inside NVIDIA's Megatron-LM repository (not shipped with megatron-core).

- `python -m megatron_switch.megatron_lm.pretrain_gpt <Megatron-LM flags> --moe-switch --num-experts N`
  and `... .pretrain_t5 ...`: run the user's Megatron-LM script (found on PYTHONPATH or through
  `--megatron-path DIR`) with our flags added to its parser and the Switch specs selected (launch.py).
- `--spec megatron_switch.spec get_switch_gpt_layer_spec` on Megatron-LM's own pretrain_gpt.py.
- arguments.py reads the Switch settings from Megatron-LM's parsed arguments; stats.py feeds the
  Switch statistics into Megatron-LM's MoE log. Nothing here is imported by megatron_switch itself
  until a Megatron-LM run asks for it.
"""
