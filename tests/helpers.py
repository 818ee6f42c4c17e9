"""Shared test helpers: tiny Megatron configs, spawned gloo process groups, reference FFNs."""

from __future__ import annotations

import os
import pickle
import socket
import warnings
from contextlib import contextmanager

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F


def tiny_config(hidden=16, ffn=32, layers=2, heads=2, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
                  use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def free_port() -> int:
    """A port free now (another process may take it before it is bound: tests that start ranks use a
    store of their own, `spawn`, or the launcher's, which bind at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, environ, pickled_args):
    args = pickle.loads(pickled_args)
    os.environ.clear()
    os.environ.update(environ)  # the test's environment, as a spawned process would inherit it
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), TORCHELASTIC_USE_AGENT_STORE="True")
    try:
        fn(rank, world_size, *args)
    finally:
        from megatron_switch.parallel import destroy_parallel

        destroy_parallel()


# What every worker imports, imported once by the forkserver that forks the workers, instead of
# once per worker (megatron.core alone takes about 6 s on one core). The server has run no tensor
# operation, so each forked worker starts with fresh thread pools, as the trainer's own launcher does.
_PRELOAD = ["megatron_switch.training.preload", "tests.helpers"]


def spawn(fn, world_size: int, *args) -> None:
    """Run fn(rank, world_size, *args) in `world_size` fresh processes; a failure in any fails the test.

    fn must be a module-level function; it calls initialize_parallel(...) itself. The processes are
    forked from a server that imported the package once (the forkserver start method), with this
    process's environment at the time of the call.
    """
    import datetime
    import multiprocessing

    from torch.distributed import TCPStore

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    # The processes meet at a store this process serves on a port the system picks as it binds it (as
    # the launcher does): two test runs on one machine never meet at one port.
    store = TCPStore("127.0.0.1", 0, world_size, True, datetime.timedelta(minutes=10), wait_for_workers=False)
    # The arguments travel by value (plain pickle): torch's own pickling would pass each tensor's memory
    # as a file descriptor, and a forkserver takes at most a few hundred per process.
    mp.start_processes(_entry, args=(fn, world_size, store.port, dict(os.environ), pickle.dumps(args)),
                       nprocs=world_size, join=True, start_method="forkserver")
    del store


def dense_ffn(x, w1, w2, b1=None, b2=None, activation="relu"):
    """A plain FFN in nn.Linear layout: w1 [f', h], w2 [h, f]; gated activations split [gate; up]."""
    h = F.linear(x, w1, b1)
    if activation in ("geglu", "swiglu"):
        gate, up = h.chunk(2, dim=-1)
        h = (F.gelu if activation == "geglu" else F.silu)(gate) * up
    else:
        h = {"relu": F.relu, "gelu": F.gelu}[activation](h)
    return F.linear(h, w2, b2)


def count_expert_rows(experts):
    """Record how many token rows the expert bank computes in each call (a list, appended to)."""
    counts = []

    def hook(module, args, output):
        x = args[0]
        counts.append(x.shape[0] * x.shape[1] if x.dim() == 3 else x.shape[0])  # padded [E, N, h] or grouped [N, h]

    experts.register_forward_hook(hook)
    return counts


@contextmanager
def counting_grouped_mm():
    """Inside: every torch._grouped_mm call is recorded (its first operand's shape, in the yielded list)."""
    grouped_mm, calls = torch._grouped_mm, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return grouped_mm(*args, **kwargs)

    torch._grouped_mm = counted
    try:
        yield calls
    finally:
        torch._grouped_mm = grouped_mm


def with_gated_gelu_ffns(model, d_model: int, d_ff: int):
    """A Hugging Face Switch T5 whose dense and expert FFNs are Hugging Face's T5 v1.1
    `T5DenseGatedActDense` (GELU-gated, as T5X computes Switch T5 v1.1): Hugging Face's Switch class
    applies its `dense_act_fn` ungated."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersDenseActDense
    from transformers.models.t5.modeling_t5 import T5Config, T5DenseGatedActDense

    gated = T5Config(d_model=d_model, d_ff=d_ff, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SwitchTransformersDenseActDense):
                setattr(module, name, T5DenseGatedActDense(gated))
    model.config.feed_forward_proj = "gated-gelu"
    return model
