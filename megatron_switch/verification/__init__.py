"""Verification cards of the released Hugging Face Switch models (`verification/<model>/` in a checkout):
each model's released config.json and what megatron-switch's conversion and model were checked to do at
that model's real shape (`megatron-switch verify --card DIR` regenerates a card).

cards.py: what a card holds, reading, writing and checking it, the table of cards; plan.py: the checks
that need no weights (the config's reading, shapes and layouts, the meta device, sparse files);
realshape.py: the checks at the real shape with random weights (round trips, the forward gate);
cli.py: the command.
"""
