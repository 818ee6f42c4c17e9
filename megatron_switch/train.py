"""`python -m megatron_switch.train <flags>`: the same as `megatron-switch train <flags>`."""

from megatron_switch.cli import train_main

if __name__ == "__main__":
    train_main()
