"""Checkpoint conversion at a few GB: time and peak memory (RSS) against the largest tensor.

--suite layouts (default): a synthetic Switch GPT checkpoint (not trained: deterministic uniform
weights, many experts) is written directly as Megatron legacy files at EP=8, then converted through
every format and a relayout: legacy EP8 -> torch_dist TP2 PP2 EP4 -> safetensors -> legacy TP1 PP2 EP8.

--suite huggingface: a synthetic Hugging Face Switch Transformers folder of Switch-Base-8's shape
(12 + 12 layers, d_model 768, d_ff 3072, 8 experts in every 2nd layer, 32128-token vocabulary;
float32, 2.5 GB) in many safetensors shards, imported (`convert --from-hf`, EP=1: the whole expert
banks on one rank, the case that needs the most memory) and exported back (`--to-hf`). The disk's
sequential read speed is measured in the same run on the same files, each time after evicting them
from the page cache (posix_fadvise DONTNEED), as is every conversion's source, and its write speed
(1 GB, fsync); a conversion reads its source twice (manifest, then copy), writes the model once and
reads it back once (verification), so its throughput is bounded by the write speed and by about a
third of the read speed.

Each step runs in a fresh process, which reports its wall time, its RSS after the imports and its
peak RSS (`ru_maxrss`): peak - baseline is what the conversion itself needed, to be read against the
largest single tensor. Every step also checks every tensor against the source's manifest.

    python benchmarks/convert.py [--suite layouts|huggingface] [--experts 128] [--hidden 1024] [--ffn 2048]
                                 [--layers 4] [--shard-size 100MB] [--workdir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def switch_gpt_shapes(layers: int, hidden: int, ffn: int, experts: int, vocab: int, seq: int):
    """Model tensors of a Switch GPT (experts in every second layer), by checkpoint key."""
    shapes = {"embedding.word_embeddings.weight": (vocab, hidden),
              "embedding.position_embeddings.weight": (seq, hidden),
              "decoder.final_layernorm.weight": (hidden,), "decoder.final_layernorm.bias": (hidden,),
              "output_layer.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"decoder.layers.{i}."
        shapes.update({p + "self_attention.linear_qkv.layer_norm_weight": (hidden,),
                       p + "self_attention.linear_qkv.layer_norm_bias": (hidden,),
                       p + "self_attention.linear_qkv.weight": (3 * hidden, hidden),
                       p + "self_attention.linear_qkv.bias": (3 * hidden,),
                       p + "self_attention.linear_proj.weight": (hidden, hidden),
                       p + "self_attention.linear_proj.bias": (hidden,),
                       p + "mlp.linear_fc1.layer_norm_weight": (hidden,),
                       p + "mlp.linear_fc1.layer_norm_bias": (hidden,)})
        if i % 2 == 1:
            shapes.update({p + "mlp.router.weight": (experts, hidden),
                           p + "mlp.experts.linear_fc1.weight": (experts, ffn, hidden),
                           p + "mlp.experts.linear_fc1.bias": (experts, ffn),
                           p + "mlp.experts.linear_fc2.weight": (experts, hidden, ffn),
                           p + "mlp.experts.linear_fc2.bias": (experts, hidden)})
        else:
            shapes.update({p + "mlp.linear_fc1.weight": (ffn, hidden), p + "mlp.linear_fc1.bias": (ffn,),
                           p + "mlp.linear_fc2.weight": (hidden, ffn), p + "mlp.linear_fc2.bias": (hidden,)})
    return shapes


def make_synthetic_reader(shapes, config):
    import torch

    from megatron_switch.checkpoint.contents import (
        CheckpointReader,
        TensorSpec,
        full_index,
    )

    class SyntheticReader(CheckpointReader):
        """Deterministic weights, produced block by block on demand (nothing is held)."""

        format_name = "synthetic"

        def read(self, name, index=None):
            """Element value = frac(golden ratio x global position + phase(name)): any block agrees with it."""
            shape = self.tensors[name].shape
            index = index or full_index(shape)
            out = torch.empty([b - a for a, b in index])
            strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
            phase = (zlib.crc32(name.encode()) % 1000) / 1000
            rows = max(1, (1 << 22) // max(1, math.prod(out.shape[1:])))  # ~4M elements at a time
            for start in range(0, out.shape[0], rows):
                sub = ((index[0][0] + start, min(index[0][1], index[0][0] + start + rows)), *index[1:])
                position = torch.zeros([1] * len(shape), dtype=torch.float64)
                for d, ((a, b), stride) in enumerate(zip(sub, strides)):
                    view = [1] * len(shape)
                    view[d] = b - a
                    position = position + (torch.arange(a, b, dtype=torch.float64) * stride).view(view)
                out[start:start + rows] = ((position * 0.6180339887498949 + phase).frac_().float() - 0.5) * 0.1
            return out

    reader = SyntheticReader("synthetic")
    reader.tensors = {n: TensorSpec(s, torch.float32) for n, s in shapes.items()}
    reader.objects = {n.rsplit(".", 1)[0] + "._extra_state": None for n in shapes if n.endswith("linear_proj.weight")}
    reader.common = {"iteration": 100, "consumed_train_samples": 1600, "model_config": config,
                     "layout": {"tp": 1, "pp": 1, "ep": 8},
                     "scheduler": {"max_lr": 1e-3, "num_steps": 100, "lr_decay_style": "cosine"}}
    return reader


def child(argv):
    """One measured step: `generate` or `convert`, in this fresh process."""
    import torch  # noqa: F401  (imported before the baseline is taken)

    from megatron_switch.checkpoint import convert as convert_module  # noqa: F401

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if argv[0] == "generate":
        from megatron_switch.checkpoint.contents import compute_manifest, write_manifest
        from megatron_switch.checkpoint.legacy import write_legacy
        from megatron_switch.checkpoint.sharding import Layout
        from megatron_switch.checkpoint.layout import TRACKER

        _, save, spec = argv
        spec = json.loads(spec)
        reader = make_synthetic_reader({k: tuple(v) for k, v in spec["shapes"].items()}, spec["config"])
        os.makedirs(save)
        names = sorted(reader.tensors)
        write_legacy(os.path.join(save, "iter_0000100"), reader, names, reader.common, Layout(1, 1, 8),
                     spec["config"]["num_layers"], _NoBar())
        with open(os.path.join(save, TRACKER), "w") as f:
            f.write("100")
        write_manifest(save, compute_manifest(reader, names, _NoBar()), {"iteration": 100})
    elif argv[0] == "generate-hf":
        _, folder, shard_bytes = argv
        write_hf_folder(folder, int(shard_bytes))
    elif argv[0] == "from-hf":
        from megatron_switch.checkpoint.huggingface_convert import import_huggingface

        _, folder, save = argv
        _evict(folder)
        import_huggingface(folder, save, progress=False, log=lambda *a: None)
    elif argv[0] == "to-hf":
        from megatron_switch.checkpoint.huggingface_convert import export_huggingface

        _, load, out, shard_bytes = argv
        _evict(load)
        export_huggingface(load, out, int(shard_bytes), progress=False, log=lambda *a: None)
    else:
        from megatron_switch.checkpoint.convert import convert

        _, load, save, tp, pp, ep, fmt = argv
        convert(load, save, int(tp), int(pp), int(ep), fmt, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak}))


# Switch-Base-8 (google/switch-base-8): its config.json, as Hugging Face publishes it
SWITCH_BASE_8 = {"architectures": ["SwitchTransformersForConditionalGeneration"], "model_type": "switch_transformers",
                 "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
                 "num_decoder_layers": 12, "num_heads": 12, "num_experts": 8, "num_sparse_encoder_layers": 6,
                 "num_sparse_decoder_layers": 6, "expert_capacity": 64, "router_bias": False,
                 "router_jitter_noise": 0.01, "router_dtype": "float32", "router_ignore_padding_tokens": False,
                 "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
                 "layer_norm_epsilon": 1e-6, "router_z_loss_coef": 0.001, "router_aux_loss_coef": 0.001,
                 "dense_act_fn": "relu", "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
                 "decoder_start_token_id": 0, "tie_word_embeddings": True}


def write_hf_folder(folder: str, shard_bytes: int) -> None:
    """A Hugging Face folder of SWITCH_BASE_8's tensors (random normal, scaled), in safetensors shards of at
    most `shard_bytes`, with its index and config.json, as save_pretrained writes them."""
    import torch

    from megatron_switch.checkpoint.consolidated import write_safetensors_file
    from megatron_switch.checkpoint.contents import TensorSpec
    from megatron_switch.checkpoint.huggingface_t5 import hf_shapes, settings_from_hf_config

    settings = settings_from_hf_config(SWITCH_BASE_8)
    shapes = hf_shapes(settings, SWITCH_BASE_8["vocab_size"])
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    os.makedirs(folder)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_file(os.path.join(folder, file), [
            (n, TensorSpec(shapes[n], torch.float32),
             lambda n=n: torch.randn(shapes[n], generator=generator) * shapes[n][-1] ** -0.5) for n in names], None)
        weight_map.update(dict.fromkeys(names, file))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(math.prod(s) * 4 for s in shapes.values())},
                   "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(SWITCH_BASE_8, f)


def _files(path):
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


def _evict(path) -> None:
    """Drop the files below `path` from the page cache (their pages are clean): the next read is the disk's."""
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_read_speed(path) -> dict:
    """Sequential read of every file below `path`, after evicting them: bytes per second, and the time."""
    _evict(path)
    total, start = 0, time.perf_counter()
    for file in _files(path):
        with open(file, "rb", buffering=0) as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds}


def disk_write_speed(directory, nbytes: int = 10**9) -> dict:
    """Sequential write of `nbytes` (16 MiB writes, then fsync) to a new file in `directory`: bytes per second."""
    block = os.urandom(16 << 20)
    path = os.path.join(directory, "write-speed.tmp")
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // len(block)):
            f.write(block)
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    written = nbytes // len(block) * len(block)
    os.remove(path)
    return {"bytes": written, "seconds": seconds, "bytes_per_second": written / seconds}


class _NoBar:
    def update(self, n):
        pass


def _du(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def measure(args_list, label):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args_list], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{label}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(baseline {result['baseline_rss_bytes'] / 2**30:.2f} GiB)", flush=True)
    return result


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--suite", choices=("layouts", "huggingface"), default="layouts")
    parser.add_argument("--shard-size", type=int, default=100 * 10**6, help="huggingface: bytes per shard.")
    parser.add_argument("--workdir", default=None, help="Default: a temporary directory (removed afterwards).")
    parser.add_argument("--out", default=None,
                        help="Default: benchmarks/results/convert.json (layouts), convert_hf.json (huggingface).")
    args = parser.parse_args()
    if args.suite == "huggingface":
        return huggingface_suite(args)
    args.out = args.out or os.path.join(ROOT, "benchmarks", "results", "convert.json")
    vocab, seq = 32768, 2048
    shapes = switch_gpt_shapes(args.layers, args.hidden, args.ffn, args.experts, vocab, seq)
    config = {"num_layers": args.layers, "hidden_size": args.hidden, "num_attention_heads": 16,
              "ffn_hidden_size": args.ffn, "num_experts": args.experts, "padded_vocab_size": vocab}
    total = sum(math.prod(s) for s in shapes.values()) * 4
    largest = max(math.prod(s) for s in shapes.values()) * 4
    print(f"synthetic Switch GPT: {len(shapes)} tensors, {total / 2**30:.2f} GiB, largest tensor "
          f"{largest / 2**30:.2f} GiB ({args.experts} experts)", flush=True)
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert-bench-")
    steps = [("legacy EP8 -> torch_dist TP2 PP2 EP4", "torch_dist", (2, 2, 4)),
             ("torch_dist -> safetensors", "safetensors", (2, 2, 4)),
             ("safetensors -> legacy TP1 PP2 EP8", "torch", (1, 2, 8))]
    results = {}
    try:
        source = os.path.join(workdir, "step0")
        results["generate legacy EP8 (synthetic)"] = measure(
            ["generate", source, json.dumps({"shapes": shapes, "config": config})], "generate legacy EP8")
        results["generate legacy EP8 (synthetic)"]["checkpoint_bytes"] = _du(source)
        for i, (label, fmt, (tp, pp, ep)) in enumerate(steps, start=1):
            target = os.path.join(workdir, f"step{i}")
            results[label] = measure(["convert", source, target, str(tp), str(pp), str(ep), fmt], label)
            results[label]["checkpoint_bytes"] = _du(target)
            shutil.rmtree(source)
            source = target
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results.values():
        r["extra_rss_bytes"] = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        r["extra_rss_over_largest_tensor"] = r["extra_rss_bytes"] / largest
    report = {"model": {"tensors": len(shapes), "total_bytes": total, "largest_tensor_bytes": largest,
                        "experts": args.experts, "hidden": args.hidden, "ffn": args.ffn, "layers": args.layers},
              "machine": {"cpus": os.cpu_count()}, "steps": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")


def huggingface_suite(args) -> None:
    out = args.out or os.path.join(ROOT, "benchmarks", "results", "convert_hf.json")
    sys.path.insert(0, ROOT)
    from megatron_switch.checkpoint.huggingface_t5 import hf_shapes, settings_from_hf_config

    shapes = hf_shapes(settings_from_hf_config(SWITCH_BASE_8), SWITCH_BASE_8["vocab_size"])
    total = sum(math.prod(s) for s in shapes.values()) * 4
    largest = max(math.prod(s) for s in shapes.values()) * 4
    workdir = args.workdir or tempfile.mkdtemp(prefix="convert-hf-bench-")
    folder, ours, back = (os.path.join(workdir, name) for name in ("hf", "ours", "back"))
    try:
        results = {"generate Hugging Face folder (synthetic)": measure(
            ["generate-hf", folder, str(args.shard_size)], "generate")}
        shards = len([f for f in os.listdir(folder) if f.endswith(".safetensors")])
        disk, disk_write = [disk_read_speed(folder)], [disk_write_speed(workdir)]
        results["--from-hf (torch_dist, EP=1)"] = measure(["from-hf", folder, ours], "--from-hf")
        disk.append(disk_read_speed(ours))
        results["--to-hf"] = measure(["to-hf", ours, back, str(args.shard_size)], "--to-hf")
        disk.append(disk_read_speed(folder))
        disk_write.append(disk_write_speed(workdir))
        for label, path in (("--from-hf (torch_dist, EP=1)", ours), ("--to-hf", back)):
            results[label]["checkpoint_bytes"] = _du(path)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    speed = statistics.median(d["bytes_per_second"] for d in disk)
    write_speed = statistics.median(d["bytes_per_second"] for d in disk_write)
    for r in results.values():
        r["extra_rss_bytes"] = r["peak_rss_bytes"] - r["baseline_rss_bytes"]
        r["extra_rss_over_largest_tensor"] = r["extra_rss_bytes"] / largest
        r["source_bytes_per_second"] = total / r["seconds"]
        r["over_disk_read_speed"] = r["source_bytes_per_second"] / speed
        r["over_disk_write_speed"] = r["source_bytes_per_second"] / write_speed
    report = {"model": {"shape": "google/switch-base-8 (float32, synthetic weights)", "tensors": len(shapes),
                        "total_bytes": total, "largest_tensor_bytes": largest, "shards": shards,
                        "shard_bytes": args.shard_size},
              "disk_read": {"runs": disk, "median_bytes_per_second": speed,
                            "note": "sequential 16 MiB reads of the same files after posix_fadvise DONTNEED"},
              "disk_write": {"runs": disk_write, "median_bytes_per_second": write_speed,
                             "note": "1 GB of 16 MiB writes to a new file in the same directory, then fsync"},
              "machine": {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}, "steps": results}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    for label, r in results.items():
        print(f"{label}: {r['seconds']:.1f} s, {r['source_bytes_per_second'] / 1e9:.2f} GB/s of the model "
              f"({r['over_disk_read_speed']:.2f} x the disk's read speed {speed / 1e9:.2f} GB/s, "
              f"{r['over_disk_write_speed']:.2f} x its write speed {write_speed / 1e9:.2f} GB/s), extra RSS "
              f"{r['extra_rss_bytes'] / 2**20:.0f} MiB = {r['extra_rss_over_largest_tensor']:.2f} x the largest "
              f"tensor ({largest / 2**20:.0f} MiB)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
