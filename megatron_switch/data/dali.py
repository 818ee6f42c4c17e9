"""The DALI data-loader backend (`--dataloader-type dali`): an NVIDIA DALI pipeline fed from the
GPT dataset through an external source, in the trainer's sampler order, one data-parallel shard
per rank, with DALI pipeline checkpointing.

Order (the contract): for the same dataset (same `--seed`), a `DaliLoader` started at global sample
`consumed` yields exactly the micro-batches of the torch path (`training.trainer._micro_batches`)
for the steps from `consumed` on: both follow `data.sampler` (Megatron's pretraining-sampler order:
groups of G = micro x DP consecutive samples, rank r's micro-batch is [g*G + r*micro, +micro) of
group g). Shuffling is the dataset's own: Megatron's GPTDataset permutes documents and samples with
`--seed`, so the pipeline adds no shuffle of its own that could break the contract.

DALI pieces: one pipeline per rank, batch size = micro-batch size; its external source is a
callable of `BatchInfo`, so DALI's checkpoint (`enable_checkpointing`, `pipeline.checkpoint()`)
records how far the source has read and a pipeline rebuilt from it resumes there. Resuming needs
no stored DALI state, though: a loader built at `consumed` starts at group consumed / G, which is
how the trainer resumes from its checkpoint's consumed-sample count (and how a run can switch
between `single` and `dali` across a restart). On CPU the pipeline runs with `device_id=None`; on
GPU with `device_id` = the rank's device, and outputs are copied to it inside the pipeline, so
DALI prefetches `prefetch_queue_depth` micro-batches onto the device ahead of the step.

DALI is imported only when a loader is built or `require_dali` is called.
"""

from __future__ import annotations

import torch

from megatron_switch.data.sampler import FIELDS, collate, rank_micro_batch_start

INSTALL_HINT = "pip install nvidia-dali-cuda120 (or the project's extra: pip install 'megatron-switch[dali]')"


class DaliUnavailableError(ImportError):
    """`--dataloader-type dali` was asked for but NVIDIA DALI cannot be imported."""


def require_dali():
    """The `nvidia.dali` module; DaliUnavailableError with the install command if it is missing."""
    try:
        import nvidia.dali
    except ImportError as err:
        raise DaliUnavailableError(
            f"--dataloader-type dali needs NVIDIA DALI, which cannot be imported ({err}): {INSTALL_HINT}; "
            f"or use --dataloader-type single") from err
    return nvidia.dali


class _ShardSource:
    """The pipeline's external source: data-parallel rank r's micro-batch of sampler group
    first_group + info.iteration, one array per field, [micro, seq]. Holds no reference to the
    loader, so a dropped loader frees its pipeline at once."""

    def __init__(self, dataset, first_group: int, micro_batch_size: int, data_parallel_size: int,
                 data_parallel_rank: int):
        self.dataset, self.first_group = dataset, first_group
        self.micro_batch_size, self.data_parallel_size = micro_batch_size, data_parallel_size
        self.data_parallel_rank = data_parallel_rank

    def __call__(self, info) -> list:
        start = rank_micro_batch_start(self.first_group + info.iteration, self.micro_batch_size,
                                       self.data_parallel_size, self.data_parallel_rank)
        if start + self.micro_batch_size > len(self.dataset):
            raise StopIteration
        batch = collate(self.dataset, start, self.micro_batch_size)
        return [batch[k].numpy() for k in FIELDS]


class DaliLoader:
    """Iterator over one data-parallel rank's steps: each `next()` is the list of the step's
    micro-batches, dicts of `FIELDS` -> [micro, seq] tensors on `device` (int64; loss_mask float32).

    Args:
        dataset: a map-style dataset of dicts with `FIELDS` (Megatron's GPTDataset).
        consumed: global samples already consumed (a multiple of micro x DP); reading starts there.
        state: a `state_dict()` of an earlier loader over the same dataset and layout; the pipeline
            is rebuilt from its DALI checkpoint. `consumed` must equal the state's position.
    Raises StopIteration when the dataset has no full step left.
    """

    def __init__(self, dataset, consumed: int, micro_batch_size: int, global_batch_size: int,
                 data_parallel_size: int, data_parallel_rank: int, device: torch.device | None = None,
                 state: dict | None = None, prefetch_queue_depth: int = 2):
        group_size = micro_batch_size * data_parallel_size
        if global_batch_size % group_size or consumed % group_size:
            raise ValueError(f"global batch {global_batch_size} and start sample {consumed} must be multiples "
                             f"of micro-batch size x data-parallel size = {group_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data-parallel rank {data_parallel_rank} is outside [0, {data_parallel_size})")
        if state is not None and int(state["consumed"]) != consumed:
            raise ValueError(f"the DALI loader state was saved at sample {state['consumed']}, but the loader is "
                             f"asked to start at sample {consumed}: pass the state saved at that sample, or none "
                             f"(the position follows from the sample count alone)")
        require_dali()
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.dataset, self.device = dataset, torch.device(device or "cpu")
        self.micro_batch_size, self.data_parallel_size = micro_batch_size, data_parallel_size
        self.data_parallel_rank = data_parallel_rank
        self.micro_batches_per_step = global_batch_size // group_size
        self.global_batch_size = global_batch_size
        self.consumed = consumed
        # The sampler group the pipeline's iteration 0 reads; a restored pipeline continues from the
        # iteration its checkpoint recorded, relative to the same first group.
        self.first_group = int(state["first_group"]) if state is not None else consumed // group_size
        on_gpu = self.device.type == "cuda"
        device_id = (self.device.index if self.device.index is not None else torch.cuda.current_device()) \
            if on_gpu else None
        self.pipeline = Pipeline(batch_size=micro_batch_size, num_threads=1, device_id=device_id,
                                 prefetch_queue_depth=prefetch_queue_depth, enable_checkpointing=True,
                                 checkpoint=None if state is None else state["pipeline"])
        with self.pipeline:
            source = _ShardSource(dataset, self.first_group, micro_batch_size, data_parallel_size,
                                  data_parallel_rank)
            outputs = fn.external_source(source=source, num_outputs=len(FIELDS), batch=True,
                                         batch_info=True,
                                         dtype=[types.INT64, types.INT64, types.FLOAT, types.INT64])
            if on_gpu:
                outputs = [out.gpu() for out in outputs]
            self.pipeline.set_outputs(*outputs)
        self._iterator = DALIGenericIterator([self.pipeline], list(FIELDS))

    def __iter__(self) -> DaliLoader:
        return self

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        if self.consumed + self.global_batch_size > len(self.dataset):
            raise StopIteration  # Megatron's sampler drops an incomplete last step
        step = [next(self._iterator)[0] for _ in range(self.micro_batches_per_step)]
        self.consumed += self.global_batch_size
        return step

    def state_dict(self) -> dict:
        """Where the loader stands, at a step boundary: {"consumed", "first_group", "pipeline"
        (DALI's serialized pipeline checkpoint, bytes)}."""
        return {"consumed": self.consumed, "first_group": self.first_group,
                "pipeline": self._iterator.checkpoints()[0]}

    def description(self) -> str:
        import nvidia.dali

        where = "device_id=None (CPU)" if self.device.type != "cuda" else f"device_id={self.pipeline.device_id}"
        return (f"DALI {nvidia.dali.__version__} pipeline, {where}, data-parallel shard "
                f"{self.data_parallel_rank}/{self.data_parallel_size}, from sample {self.consumed}")
