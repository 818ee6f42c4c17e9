"""`python -m megatron_switch.megatron_lm.pretrain_t5 [--megatron-path DIR] <Megatron-LM flags>
--moe-switch --num-experts N`: Megatron-LM's pretrain_t5.py with Switch layers every k-th layer of
the encoder and the decoder (launch.py; the model provider is providers.t5_model_provider)."""

from megatron_switch.megatron_lm.launch import main

if __name__ == "__main__":
    main("pretrain_t5.py")
