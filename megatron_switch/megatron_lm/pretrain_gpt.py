"""`python -m megatron_switch.megatron_lm.pretrain_gpt [--megatron-path DIR] <Megatron-LM flags>
--moe-switch --num-experts N`: Megatron-LM's pretrain_gpt.py with Switch layers (see launch.py)."""

from megatron_switch.megatron_lm.launch import main

if __name__ == "__main__":
    main("pretrain_gpt.py")
