"""Faults, injected for real, and what the trainer guarantees under each.

A corrupted shard, a non-finite loss, a rank killed with SIGKILL at a chosen point of a step, a
save, a load or an evaluation (`training.faults`), a full disk (a small tmpfs), a read-only or
wrong --save path, another run's checkpoints in --save, a changed schedule or vocabulary padding on
resume, a stale launcher environment, bad data: each test runs the real command and asserts the
outcome (exit status, the message, what is on disk, that no process is left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--seq-length", "32",
        "--micro-batch-size", "2", "--moe-switch", "--num-experts", "4", "--moe-layer-freq", "2",
        "--log-interval", "1", "--moe-input-jitter-eps", "0"]
EP2 = ["--nproc-per-node", "2", "--expert-model-parallel-size", "2"]
REPORTED = 3  # a rank's one-line error (training.trainer.REPORTED_ERROR_EXIT)
KILLED = 128 + signal.SIGKILL


def train(args, cwd, env=None, **extra):
    """`megatron-switch train` in a fresh process; returns (completed process, seconds)."""
    environment = {**os.environ, "MEGATRON_SWITCH_CACHE": os.path.join(str(cwd), "cache"), **(env or {})}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in (env or {}):
            environment.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megatron_switch.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=environment, **extra)
    return proc, time.perf_counter() - start


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tracker(root) -> int | None:
    path = os.path.join(root, "latest_checkpointed_iteration.txt")
    return int(open(path).read()) if os.path.isfile(path) else None


def snapshot(root) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def survivors(cache_dir: str) -> list[str]:
    """Processes still alive that belong to a run (its environment names this cache directory)."""
    left = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        try:
            if process.environ().get("MEGATRON_SWITCH_CACHE") == cache_dir and process.pid != os.getpid():
                left.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return left


def model_tensors_finite(iter_dir: str) -> bool:
    from megatron_switch.checkpoint.distcp import DistCheckpointReader

    reader = DistCheckpointReader(iter_dir)
    try:
        return all(torch.isfinite(reader.read(name)).all() for name in reader.tensors)
    finally:
        reader.close()


# -- integrity ------------------------------------------------------------------------------------

def test_corrupt_shard_is_refused_and_the_last_good_iteration_named(tmp_path):
    ckpt = tmp_path / "ckpt"
    ok(train([*EP2, *TINY, "--train-iters", "4", "--save-interval", "2", "--save", str(ckpt)], tmp_path)[0])
    shard = sorted((ckpt / "iter_0000004").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = os.urandom(64)  # random bytes in the middle: the size is unchanged
    shard.write_bytes(bytes(data))
    before = snapshot(ckpt)

    proc, _ = train([*EP2, *TINY, "--train-iters", "6", "--load", str(ckpt), "--save", str(ckpt),
                     "--override-opt_param-scheduler"], tmp_path)
    assert proc.returncode == REPORTED, proc.stderr[-3000:]
    assert f"checkpoint {ckpt}/iter_0000004 is corrupt: {shard.name} bytes" in proc.stderr
    assert "do not match their checksum" in proc.stderr
    assert f"iteration 2: resume from it with --load {ckpt} --ckpt-step 2" in proc.stderr
    assert "iteration " not in proc.stdout.replace("at iteration", "")  # not one step trained
    assert snapshot(ckpt) == before

    from megatron_switch.checkpoint.convert import convert
    from megatron_switch.checkpoint.layout import CheckpointError

    with pytest.raises(CheckpointError, match="is corrupt"):
        convert(str(ckpt), str(tmp_path / "converted"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "converted").exists()

    resumed, _ = train([*EP2, *TINY, "--train-iters", "6", "--load", str(ckpt), "--ckpt-step", "2",
                        "--override-opt_param-scheduler", "--plots-dir", str(tmp_path / "p")], tmp_path)
    assert "loaded checkpoint" in ok(resumed).stdout and "at iteration 2" in resumed.stdout


# -- non-finite values --------------------------------------------------------------------------------

def test_nonfinite_loss_stops_the_run_and_is_never_saved(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc, _ = train([*TINY, "--train-iters", "20", "--lr", "1e6", "--clip-grad", "0", "--save-interval", "1",
                     "--save", str(ckpt)], tmp_path)
    assert proc.returncode == REPORTED, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "is not finite" in proc.stderr and "stopped without saving" in proc.stderr
    stopped_at = int(proc.stderr.split("iteration ")[1].split(":")[0])
    latest = tracker(ckpt)
    assert latest is not None and latest < stopped_at
    assert f"the latest checkpoint is iteration {latest}" in proc.stderr
    assert model_tensors_finite(str(ckpt / f"iter_{latest:07d}"))

    skipping, _ = train([*TINY, "--train-iters", "6", "--lr", "1e6", "--clip-grad", "0",
                         "--no-check-for-nan-in-loss-and-grad", "--save", str(tmp_path / "skip")], tmp_path)
    assert "step skipped (no update)" in ok(skipping).stdout
    assert model_tensors_finite(str(tmp_path / "skip" / "iter_0000006"))


# -- dead ranks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["step:1:2", "save:1:2", "load:1", "eval:0:2"])
def test_a_killed_rank_ends_the_whole_job_and_leaves_nothing_behind(tmp_path, point):
    ckpt = tmp_path / "ckpt"
    common = [*EP2, *TINY, "--train-iters", "4", "--lr-decay-iters", "4", "--save", str(ckpt)]
    if point.startswith("load"):
        ok(train([*common, "--save-interval", "2"], tmp_path)[0])
        common = [*EP2, *TINY, "--train-iters", "6", "--lr-decay-iters", "4", "--save", str(ckpt), "--load", str(ckpt)]
    elif point.startswith("eval"):
        common += ["--eval-interval", "2", "--eval-iters", "2"]
    else:
        common += ["--save-interval", "1"]
    before = tracker(ckpt)
    proc, seconds = train(common, tmp_path, env={"MEGATRON_SWITCH_FAULT": point})
    rank = point.split(":")[1]
    print(f"\n[fault {point}] exit {proc.returncode} after {seconds:.1f} s: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == KILLED, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"rank {rank} (pid " in proc.stderr and "was killed by SIGKILL" in proc.stderr
    assert survivors(str(tmp_path / "cache")) == []
    if point.startswith("save"):
        assert tracker(ckpt) == 1  # iteration 2's save never completed: iteration 1 stays the latest
        assert not (ckpt / "iter_0000002").exists()
        if not (ckpt / "iter_0000002.tmp").exists():  # the surviving rank's failed save removed it first
            shutil.copytree(ckpt / "iter_0000001", ckpt / "iter_0000002.tmp")  # as a save killed everywhere leaves it
        rerun, _ = train([*EP2, *TINY, "--train-iters", "4", "--lr-decay-iters", "4", "--save", str(ckpt),
                          "--load", str(ckpt)], tmp_path)
        assert "removed iter_0000002.tmp" in ok(rerun).stdout and "at iteration 1" in rerun.stdout
    elif point.startswith("load"):
        assert tracker(ckpt) == before == 4


# -- stalled ranks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["step:1:3", "step:0:3"])
def test_a_stopped_rank_ends_the_job_naming_it_and_the_operation(tmp_path, point):
    """SIGSTOP (the rank stops answering, as a hung or swapped-out node does; `training.faults`): the job
    ends with the reported-error status and one line naming the stopped rank, where it was and the
    collective the other rank waited in; the stopped rank is ended too. A small timeout keeps it short
    (--distributed-timeout-minutes takes fractions); the test asserts the outcome, not the time."""
    rank = int(point.split(":")[1])
    proc, seconds = train([*EP2, *TINY, "--train-iters", "50", "--distributed-timeout-minutes", "0.2"],
                          tmp_path, env={"MEGATRON_SWITCH_FAULT": f"{point}:STOP"})
    print(f"\n[SIGSTOP {point}] exit {proc.returncode} after {seconds:.1f} s: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == REPORTED, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-switch train: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert f"rank {rank} stopped answering: no heartbeat for" in errors[0]
    assert "(--distributed-timeout-minutes 0.2)" in errors[0]
    assert f"rank {1 - rank} was in torch.distributed." in errors[0]  # the collective the other one waits in
    assert "Traceback" not in proc.stderr
    assert survivors(str(tmp_path / "cache")) == []


def test_two_local_jobs_run_side_by_side_and_a_given_port_is_honoured(tmp_path):
    """Each local launch meets at a rendezvous store bound to a free port, printed as the ranks start;
    --master-port and MASTER_PORT are honoured (and refused, named, when taken)."""
    def start(name, args, env=None):
        environment = dict(os.environ, MEGATRON_SWITCH_CACHE=str(tmp_path / "cache"), **(env or {}))
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in (env or {}):
                environment.pop(var, None)
        return subprocess.Popen([sys.executable, "-m", "megatron_switch.train", *EP2, *TINY, "--train-iters", "3",
                                 "--plots-dir", str(tmp_path / name), *args], cwd=tmp_path, env=environment,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    busy = _busy_port()
    try:
        taken = busy.getsockname()[1]
        given = _busy_port()
        port = given.getsockname()[1]
        given.close()  # (free again: the job binds it)
        jobs = [start("a", []), start("b", []), start("c", [], env={"MASTER_PORT": str(port)})]
        outputs = [job.communicate() for job in jobs]
        for job, (out, err) in zip(jobs, outputs):
            assert job.returncode == 0, out[-2000:] + err[-3000:]
        addresses = [out.split("waiting for 2 ranks at ")[1].split()[0] for out, _ in outputs]
        assert addresses[2] == f"127.0.0.1:{port}"
        assert len(set(addresses)) == 3 and all(a.startswith("127.0.0.1:") for a in addresses), addresses
        assert f":{taken}" not in " ".join(addresses)
        refused, _ = train([*EP2, *TINY, "--train-iters", "1"], tmp_path, env={"MASTER_PORT": str(taken)})
        assert refused.returncode == 2
        assert f"MASTER_PORT {taken} is in use on this machine: pass another port" in refused.stderr
    finally:
        busy.close()


# -- the disk -----------------------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs mounted for the test (root only), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_cleans_up(tmp_path, tmpfs):
    ckpt = tmpfs / "ckpt"
    env = dict(os.environ, MEGATRON_SWITCH_CACHE=str(tmp_path / "cache"))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen([sys.executable, "-m", "megatron_switch.train", *TINY, "--train-iters", "40",
                             "--save-interval", "2", "--save", str(ckpt), "--plots-dir", str(tmp_path / "plots")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    saved = []
    for line in proc.stdout:
        if line.startswith(" saved checkpoint"):
            saved.append(line.split("/iter_")[1].strip())
            if len(saved) == 1:  # fill the disk to its last KiB
                with open(tmpfs / "filler", "wb") as f:
                    f.write(b"\0" * (shutil.disk_usage(tmpfs).free - 1024))
    err = proc.stderr.read()
    assert proc.wait() == REPORTED, err[-3000:]
    assert "failed" in err and "MiB free" in err and "removed the partial iter_" in err
    assert f"the latest checkpoint is still iteration {int(saved[-1])}" in err
    assert tracker(ckpt) == int(saved[-1])
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]


def test_save_paths_are_checked_before_any_work(tmp_path, tmpfs):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc, _ = train([*TINY, "--train-iters", "2", "--save", str(not_a_dir)], tmp_path)
    assert proc.returncode == 2 and "exists and is not a directory" in proc.stderr
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc, _ = train([*TINY, "--train-iters", "2", "--save", str(tmpfs / "ckpt")], tmp_path)
    assert proc.returncode == 2 and "is not writable (Read-only file system)" in proc.stderr
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    with open(tmpfs / "filler", "wb") as f:
        f.write(b"\0" * (shutil.disk_usage(tmpfs).free - 64 * 1024))
    proc, _ = train([*TINY, "--train-iters", "2", "--save", str(tmpfs / "ckpt")], tmp_path)
    assert proc.returncode == 2 and "free, one checkpoint of this model needs about" in proc.stderr


def test_another_runs_checkpoints_are_never_overwritten(tmp_path):
    ckpt = tmp_path / "ckpt"
    ok(train([*TINY, "--train-iters", "2", "--save", str(ckpt)], tmp_path)[0])
    before = snapshot(ckpt)
    proc, _ = train([*TINY, "--hidden-size", "64", "--train-iters", "2", "--save", str(ckpt)], tmp_path)
    assert proc.returncode == 2 and "already holds checkpoints (iterations 2..2)" in proc.stderr
    assert f"pass --load {ckpt} too" in proc.stderr
    proc, _ = train([*TINY, "--hidden-size", "64", "--train-iters", "4", "--save", str(ckpt), "--load", str(ckpt)],
                    tmp_path)
    assert proc.returncode == 2 and "--hidden-size is 32 in the checkpoint, 64 here" in proc.stderr
    assert snapshot(ckpt) == before


# -- resuming ----------------------------------------------------------------------------------------------

def test_resume_schedule_follows_megatron_lms_rule(tmp_path):
    ckpt = tmp_path / "ckpt"
    ok(train([*TINY, "--train-iters", "4", "--save", str(ckpt), "--lr", "1e-3"], tmp_path)[0])
    longer = [*TINY, "--train-iters", "6", "--load", str(ckpt), "--lr", "1e-3"]
    proc, _ = train(longer, tmp_path)
    assert proc.returncode == 2
    assert "--lr-decay-iters is 4 in the checkpoint, 6 here (it defaults to --train-iters)" in proc.stderr
    assert "--override-opt_param-scheduler" in proc.stderr and "--use-checkpoint-opt_param-scheduler" in proc.stderr
    ok(train([*longer, "--override-opt_param-scheduler", "--plots-dir", str(tmp_path / "override")], tmp_path)[0])
    ok(train([*longer, "--use-checkpoint-opt_param-scheduler", "--plots-dir", str(tmp_path / "kept")], tmp_path)[0])

    def lrs(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line)["lr"] for line in f]
    assert lrs("override")[0] > 0  # cosine over 6 iterations: iteration 5 still learns (6 reaches --min-lr 0)
    assert lrs("kept") == [0.0, 0.0]  # the checkpoint's schedule had ended at iteration 4


def test_padded_vocabulary_mismatch_is_refused_with_the_flag_that_matches(tmp_path):
    ckpt = tmp_path / "ckpt"
    ok(train([*TINY, "--train-iters", "2", "--lr-decay-iters", "10", "--save", str(ckpt)], tmp_path)[0])
    at_tp2 = ["--nproc-per-node", "2", "--tensor-model-parallel-size", "2", *TINY, "--train-iters", "3",
              "--lr-decay-iters", "10", "--load", str(ckpt), "--plots-dir", str(tmp_path / "p")]
    proc, _ = train(at_tp2, tmp_path)
    assert proc.returncode == 2
    assert "the padded vocabulary has 384 rows in the checkpoint, 512 here" in proc.stderr
    assert "pass --make-vocab-size-divisible-by 192 at TP=2" in proc.stderr
    assert "at iteration 2" in ok(train([*at_tp2, "--make-vocab-size-divisible-by", "192"], tmp_path)[0]).stdout


def test_legacy_pipeline_checkpoint_with_tied_embeddings_resumes(tmp_path):
    """A --format torch checkpoint at PP=2 with tied embeddings (the last stage keeps no copy of its
    own) resumes at its layout exactly as the torch_dist checkpoint it was converted from."""
    from megatron_switch.checkpoint.convert import convert

    pp2 = ["--nproc-per-node", "2", "--pipeline-model-parallel-size", "2", *TINY, "--lr-decay-iters", "4"]
    ok(train([*pp2, "--train-iters", "2", "--save", str(tmp_path / "dist")], tmp_path)[0])
    convert(str(tmp_path / "dist"), str(tmp_path / "legacy"), fmt="torch", progress=False, log=lambda *a: None)
    for name in ("dist", "legacy"):
        ok(train([*pp2, "--train-iters", "4", "--load", str(tmp_path / name),
                  "--plots-dir", str(tmp_path / f"p-{name}")], tmp_path)[0])
    first, second = ([json.loads(line) for line in (tmp_path / f"p-{name}" / "metrics.jsonl").read_text().splitlines()]
                     for name in ("dist", "legacy"))
    assert [r["iteration"] for r in first] == [r["iteration"] for r in second] == [3, 4]
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k != "tokens_per_s"} == {
            k: v for k, v in b.items() if k != "tokens_per_s"}


# -- the launch environment, data and flags: answered before any process starts --------------------------

def _tiny_dataset(prefix, token_ids):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    builder.add_document(torch.tensor(token_ids, dtype=torch.int64), [len(token_ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_token_ids_beyond_the_vocabulary_are_named(tmp_path):
    data = _tiny_dataset(tmp_path / "wide", [1, 2, 300] * 200)
    proc, _ = train([*TINY, "--train-iters", "2", "--data-path", data, "--split", "1,0,0"], tmp_path)
    assert proc.returncode == REPORTED, proc.stderr[-3000:]
    assert "token id 300, but the tokenizer has 258 ids" in proc.stderr


def test_weighted_data_blend_trains(tmp_path):
    a = _tiny_dataset(tmp_path / "a", list(range(250)) * 8)
    b = _tiny_dataset(tmp_path / "b", list(range(100, 250)) * 8)
    ok(train([*TINY, "--train-iters", "2", "--data-path", "0.5", a, "0.5", b, "--split", "1,0,0",
              "--plots-dir", str(tmp_path / "p")], tmp_path)[0])


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    one_token = _tiny_dataset(root / "one", [65])
    _tiny_dataset(root / "truncated", list(range(200)))
    idx = root / "truncated.idx"
    idx.write_bytes(idx.read_bytes()[:40])
    junk = root / "junk-tokenizer"
    junk.mkdir()
    (junk / "tokenizer.json").write_text("{not json")
    (root / "st").mkdir()
    (root / "st" / "model.safetensors.index.json").write_text("{}")
    (root / "ckpt" / "iter_0000004").mkdir(parents=True)
    (root / "ckpt" / "iter_0000004" / "metadata.json").write_text("{}")
    (root / "ckpt" / "latest_checkpointed_iteration.txt").write_text("4")
    # .bin/.idx pairs that were not written together (both preprocessed, so both have a fingerprint)
    from megatron_switch.data.preprocess import write_indexed_dataset
    from megatron_switch.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("ByteLevelTokenizer", None)
    for name, text in (("short", "a" * 300), ("long", "b" * 900), ("other", "c" * 300)):
        write_indexed_dataset([text], str(root / name), tokenizer)
    shutil.copy(root / "short.idx", root / "long.idx")  # another dataset's index: the .bin is longer
    shutil.copy(root / "other.bin", root / "short.bin")  # another dataset's tokens: the same size
    return root, one_token


FLAG_CASES = [
    (["--moe-layer-freq", "3"], "no layer would be a Switch layer"),
    (["--split", "100,0,0", "--eval-interval", "2"], "gives the validation set no data"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    (["--lr", "-1"], "--lr must be in [0, inf), got -1.0"),
    (["--global-batch-size", "0"], "--global-batch-size must be >= 1, got 0"),
    (["--moe-ffn-hidden-size", "0"], "--moe-ffn-hidden-size (expert FFN width) must be >= 1"),
    (["--nproc-per-node", "0"], "--nproc-per-node must be >= 1, got 0"),
    (["--data-path", "0.5", "a", "0.5"], "a weighted blend is WEIGHT PREFIX pairs"),
    (["--data-path", "{root}/one"], "holds 1 tokens, fewer than one training sample"),
    (["--data-path", "{root}/truncated"], "truncated.idx is truncated"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{root}/none"], "no such file or directory"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "{root}/junk-tokenizer"],
     "is not a usable Hugging Face tokenizer"),
    (["--load", "{root}/ckpt/iter_0000004"], "pass its parent, --load {root}/ckpt --ckpt-step 4"),
    (["--load", "{root}/st"], "is a consolidated safetensors checkpoint"),
    (["--master-port", "{busy}"], "is in use on this machine"),
    (["--data-path", "{root}/long"], "{root}/long.bin (1802 bytes) and {root}/long.idx (its sequences end at byte "
                                     "602) are not one pair"),  # 901 and 301 byte-level tokens of 2 bytes
    (["--data-path", "{root}/short"],
     "{root}/short.bin and {root}/short.idx do not match {root}/short.fingerprint.json"),
    (["--ckpt-step", "2"], "--ckpt-step needs --load DIR"),
]


@pytest.mark.parametrize("flags,message", FLAG_CASES, ids=[" ".join(f[:2]) for f, _ in FLAG_CASES])
def test_bad_input_is_answered_before_any_process_starts(tmp_path, bad_inputs, flags, message):
    root, _ = bad_inputs
    busy = _busy_port()
    try:
        fill = {"root": str(root), "busy": str(busy.getsockname()[1])}
        args = [flag.format(**fill) for flag in flags]
        proc, seconds = train([*TINY, "--train-iters", "1", *args], tmp_path)
    finally:
        busy.close()
    print(f"\n[flags {' '.join(flags)}] exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.format(**fill) in proc.stderr
    assert "Traceback" not in proc.stderr
    # the error and where to read about the flags, not argparse's usage of every flag first
    assert proc.stderr.strip().splitlines()[-1] == "(`megatron-switch train --help` describes every flag)", proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2 and "usage:" not in proc.stderr, proc.stderr
    # a check that comes after the ranks' imports have started (the tokenizer's) ends them too
    assert survivors(str(tmp_path / "cache")) == []


def test_a_stale_launcher_environment_is_explained(tmp_path):
    proc, seconds = train([*TINY, "--train-iters", "1"], tmp_path, env={"WORLD_SIZE": "2"})
    print(f"\n[WORLD_SIZE=2 in the shell] exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 2
    assert "WORLD_SIZE=2 is set, but not all of RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT" in proc.stderr
    assert "Unset WORLD_SIZE" in proc.stderr


def test_other_commands_refuse_a_zero_read_as_default(tmp_path, capsys):
    from megatron_switch.planning.cli import plan_main, sbatch_main

    ckpt = tmp_path / "ckpt"
    ok(train([*TINY, "--train-iters", "1", "--save", str(ckpt)], tmp_path)[0])
    for flag in ("--target-tp", "--target-pp", "--target-ep"):
        proc = subprocess.run([sys.executable, "-m", "megatron_switch.cli", "convert", "--load", str(ckpt),
                               "--save", str(tmp_path / "out"), flag, "0"], capture_output=True, text=True, check=False)
        assert proc.returncode == 1 and f"{flag} must be >= 1" in proc.stderr and not (tmp_path / "out").exists()
    cases = [
        (plan_main, ["--preset", "tiny", "--nodes", "1", "--gpu-memory", "0GB"], "a memory size must be more than 0"),
        (plan_main, ["--preset", "tiny", "--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
        (sbatch_main, ["--preset", "tiny", "--cpu", "--nodes", "1", "--save", "x", "--time", "4h"],
         "--time '4h' is not a SLURM time: use HH:MM:SS"),
        (sbatch_main, ["--preset", "tiny", "--cpu", "--nodes", "1", "--save", "x", "--time", "00:01:00"],
         "--signal-seconds 60 is not inside --time 00:01:00"),
        (sbatch_main, ["--preset", "tiny", "--cpu", "--nodes", "1", "--save", "x", "--extra-args", "--no-such-flag 3"],
         "`megatron-switch train` does not take --no-such-flag"),
    ]
    for main, argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# -- inputs of the other commands, refused with the file named --------------------------------------------

def _command(args, cwd, stdout=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "megatron_switch.cli", *args], cwd=cwd, stdout=stdout,
                            stderr=subprocess.PIPE, text=True)


def test_preprocess_refuses_empty_binary_and_undecodable_inputs(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "random.txt").write_bytes(bytes(range(256)) * 64)  # binary: a NUL byte first
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "number.jsonl").write_bytes(b'{"text": 3}\n')
    cases = [("empty.txt", "input empty.txt is empty: it holds no text to tokenize"),
             ("random.txt", "random.txt: a NUL byte at byte 0: binary data, not text"),
             ("latin1.txt", "latin1.txt: not UTF-8 text (byte 3 is b'\\xe9')"),
             ("bad.jsonl", "bad.jsonl:2: not UTF-8 text"),
             ("number.jsonl", "number.jsonl:1: 'text' holds a int, not text")]
    for name, message in cases:
        proc = _command(["preprocess", "--input", name, "--output-prefix", "out/data"], tmp_path)
        out, err = proc.communicate()
        assert proc.returncode == 2, (name, out, err)
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 2, (name, err)
        assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []  # nothing written


def test_a_data_path_may_name_the_bin_file(tmp_path):
    from megatron_switch.data.check import dataset_tokens, parse_data_path
    from megatron_switch.data.preprocess import write_indexed_dataset
    from megatron_switch.data.tokenizers import build_tokenizer

    write_indexed_dataset(["some text"], str(tmp_path / "x"), build_tokenizer("ByteLevelTokenizer", None))
    for given in ("x.bin", "x.idx", "x"):
        prefixes, _ = parse_data_path([str(tmp_path / given)])
        assert prefixes == [str(tmp_path / "x")] and dataset_tokens(prefixes[0]) == 10
    assert parse_data_path(["1", str(tmp_path / "x.bin")]) == ([str(tmp_path / "x")], [1.0])


def test_plan_says_as_json_that_nothing_fits_and_a_closed_pipe_ends_quietly(tmp_path):
    proc = _command(["plan", "--preset", "switch-c-2048", "--nodes", "1", "--gpus-per-node", "1", "--json"], tmp_path)
    out, err = proc.communicate()
    assert proc.returncode == 2
    report = json.loads(out)
    assert report["fits"] is False and report["layouts"] == [] and "GPUs would fit it" in report["error"]
    assert report["model"] == "switch-c-2048" and "nothing fits" in err

    proc = _command(["plan", "--preset", "switch-base-128", "--nodes", "4", "--top", "20"], tmp_path)
    proc.stdout.close()  # the reader is gone before the plan is printed (`plan ... | head`)
    err = proc.stderr.read()
    assert proc.wait() == 128 + signal.SIGPIPE and err == "", err


def test_an_unwritable_working_directory_is_refused_before_any_rank_starts(tmp_path, tmpfs):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    proc, _ = train([*TINY, "--train-iters", "1"], tmpfs, env={"MEGATRON_SWITCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--plots-dir ./plots (the default: ./plots without --save, <save>/plots with it) is not writable " \
           "(Read-only file system)" in proc.stderr
    assert "Traceback" not in proc.stderr and survivors(str(tmp_path / "cache")) == []
