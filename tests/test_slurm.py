"""The generated sbatch script on a real SLURM: the tiny preset (EP=2, 4 processes) trains, saves, gets
the preemption signal, requeues itself and finishes from its checkpoint, on one node and on two nodes;
the two-node run's loss curve equals the one-node run's. The Megatron-LM script's dry run names the
nodes of a real allocation.

Needs a running cluster: `launch/local_slurm.sh --nodes 2` starts one here (CI does); a one-node
cluster runs the one-node tests and skips the two-node ones. Skipped without a cluster, unless
MEGATRON_SWITCH_REQUIRE_SLURM=1 (CI), which turns a missing cluster or a missing second node into a
failure.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_switch.planning.cli import sbatch_main
from megatron_switch.planning.slurm import Partition, query_partition

TRAIN_ITERS = 20
SAVE_INTERVAL = 5
POLL_SECONDS = 0.5
# What the runs' metrics must agree on: every logged value but the throughput.
COMPARED = ("iteration", "lm_loss", "aux_loss", "z_loss", "dropped_fraction", "lr", "grad_norm")


def _required() -> bool:
    return os.environ.get("MEGATRON_SWITCH_REQUIRE_SLURM") == "1"


def _slurm_ready() -> str | None:
    """None when sbatch works here, else why not."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (apt-get install slurm-wlm munge; launch/local_slurm.sh --nodes 2)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "UP" not in ping.stdout:
        return (f"slurmctld is not running (launch/local_slurm.sh --nodes 2): {ping.stdout.strip()} "
                f"{ping.stderr.strip()}")
    return None


@pytest.fixture(scope="module")
def slurm() -> Partition:
    """The default partition of the running cluster (skip, or fail in CI, without one)."""
    problem = _slurm_ready()
    if problem:
        if _required():
            pytest.fail(problem)
        pytest.skip(problem)
    partition = query_partition(None)
    assert partition is not None and partition.nodes >= 1, "sinfo lists no usable node in the default partition"
    return partition


@pytest.fixture
def two_nodes(slurm) -> Partition:
    if slurm.nodes < 2:
        problem = (f"the default partition has {slurm.nodes} usable node(s); the two-node tests need 2 "
                   "(launch/local_slurm.sh --nodes 2)")
        if _required():
            pytest.fail(problem)
        pytest.skip(problem)
    return slurm


FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _job(job: str) -> dict | None:
    """slurmctld's record of the job (kept MinJobAge seconds after it ends): JobState, Restarts, Reason, ...
    None when slurmctld did not answer this time (it can be busy on a loaded machine: ask again)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=False)
    if done.returncode != 0 or "JobState=" not in done.stdout:
        return None
    return dict(field.split("=", 1) for field in done.stdout.split() if "=" in field)


def _wait(job: str, condition, what: str, log: str) -> dict:
    """Poll slurmctld until condition(record) holds; fail if the job fails or completes first."""
    while True:
        record = _job(job)
        if record is not None:
            if condition(record):
                return record
            if record["JobState"] in FAILED_STATES or record["JobState"] == "COMPLETED":
                text = _read(log) or "(no log)"
                pytest.fail(f"job {job} is {record['JobState']} before {what}:\n{text[-4000:]}")
        time.sleep(POLL_SECONDS)


def _read(path: str) -> str:
    return Path(path).read_text() if os.path.exists(path) else ""


def _tracker(save: str) -> int:
    try:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _script(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sbatch_main(argv)
    return out.getvalue()


def _submit(directory: Path, script: str, *sbatch_flags: str) -> str:
    path = directory / "job.sbatch"
    path.write_text(script)
    env = dict(os.environ, MEGATRON_SWITCH_CACHE=str(directory / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    submit = subprocess.run(["sbatch", "--parsable", *sbatch_flags, str(path)], capture_output=True, text=True,
                            env=env, cwd=directory, check=False)
    assert submit.returncode == 0, submit.stderr
    return submit.stdout.strip().split(";")[0]


def _cancel_if_alive(job: str) -> None:
    record = _job(job)
    if record is not None and record["JobState"] in ("PENDING", "RUNNING", "SUSPENDED", "REQUEUED"):
        subprocess.run(["scancel", job], check=False)


def _run_preempted(directory: Path, partition: Partition, nodes: int, *sbatch_flags: str) -> dict:
    """The tiny preset, EP=2 on 4 processes over `nodes` node(s): train to the first checkpoint, preempt
    with USR1 to the batch script (as --signal=B:USR1 does), let the script requeue the whole job, and
    wait until it has finished from its checkpoint. Returns what the checks need."""
    save, log = str(directory / "ckpt"), str(directory / "job.log")
    tasks = 4 // nodes
    fit = ["--overcommit"] if partition.cpus_on(nodes) < tasks else []
    script = _script(["--preset", "tiny", "--cpu", "--nodes", str(nodes), "--gpus-per-node", str(tasks), *fit,
                      "--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "1",
                      "--pipeline-model-parallel-size", "1", "--save", save, "--train-iters", str(TRAIN_ITERS),
                      "--lr-warmup-iters", "5", "--save-interval", str(SAVE_INTERVAL), "--log-interval", "1",
                      "--output", log, "--time", "00:30:00", "--python", sys.executable])
    assert f"fitted to SLURM partition {partition.name!r}" in script
    job = _submit(directory, script, *sbatch_flags)
    try:
        _wait(job, lambda r: _tracker(save) >= SAVE_INTERVAL, "its first checkpoint", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        # The script requeues the job; SLURM starts it again after AuthInfo's cred_expire (10 s on the
        # test cluster, launch/local_slurm.sh). Releasing it earlier by hand races with the end of the first
        # run (slurmctld then records that run's exit as the job's end: FAILED).
        record = _wait(job, lambda r: r["JobState"] == "COMPLETED" and int(r.get("Restarts", 0)) >= 1,
                       "it finished", log)
    finally:
        _cancel_if_alive(job)
    assert record["Restarts"] == "1", record
    text = _read(log)
    with open(os.path.join(save, "plots", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return dict(save=save, log=text, metrics=metrics, job=job)


def _check_preempted_and_resumed(run: dict) -> tuple[int, list[str]]:
    """The log tells the story: signal, save, requeue, load, resume where it stopped, finish.
    Returns the preempted iteration and the log's two runs."""
    text, save = run["log"], run["save"]
    stopped = re.search(r"exiting at iteration (\d+) \(signal\)", text)
    assert stopped, text[-4000:]
    preempted_at = int(stopped.group(1))
    assert SAVE_INTERVAL <= preempted_at < TRAIN_ITERS
    first_run, second_run = re.split(r"^(?=job \d+ \(restart 1\))", text, flags=re.M)
    assert "preemption signal, training saves a checkpoint and exits" in first_run
    assert f"saved checkpoint {save}/iter_{preempted_at:07d}" in first_run
    assert f"requeued to resume from {save}" in first_run
    assert f"resume: --load {save}" in second_run
    assert f"loaded checkpoint {save} at iteration {preempted_at}" in second_run
    logged = [int(i) for i in re.findall(r"iteration\s+(\d+)/\s*\d+", second_run)]
    assert logged and logged[0] == preempted_at + 1 and logged[-1] == TRAIN_ITERS  # resumed, not restarted
    assert f"latest checkpoint at iteration {TRAIN_ITERS} of {TRAIN_ITERS}" in second_run
    assert "requeued" not in second_run
    assert _tracker(save) == TRAIN_ITERS
    assert os.path.isfile(os.path.join(save, f"iter_{TRAIN_ITERS:07d}", "metadata.json"))
    # one metrics record per iteration across both runs: nothing repeated, nothing missing
    assert [m["iteration"] for m in run["metrics"]] == list(range(1, TRAIN_ITERS + 1))
    return preempted_at, [first_run, second_run]


def _rendezvous(node: str) -> str:
    """The address the script must choose for `node`: its name if it resolves, else its NodeAddr."""
    if subprocess.run(["getent", "hosts", node], capture_output=True, check=False).returncode == 0:
        return node
    shown = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True, check=True)
    return re.search(r"NodeAddr=(\S+)", shown.stdout).group(1)


def _placement(run_text: str) -> dict[int, tuple[str, int, int]]:
    """rank -> (node name, node rank, local rank), from the line each task prints as it starts."""
    found = re.findall(r"^rank (\d+) of 4: node (\S+) \(node rank (\d+)\), local rank (\d+)$", run_text, re.M)
    return {int(r): (name, int(node), int(local)) for r, name, node, local in found}


@pytest.fixture(scope="module")
def one_node_run(slurm, tmp_path_factory) -> dict:
    """4 processes (EP=2, DP=2) on one node, preempted and requeued: the reference for the two-node run."""
    return _run_preempted(tmp_path_factory.mktemp("one-node"), slurm, 1)


def test_one_node_job_trains_is_preempted_requeues_and_finishes(one_node_run):
    preempted_at, runs = _check_preempted_and_resumed(one_node_run)
    for run_text in runs:
        placement = _placement(run_text)
        assert sorted(placement) == [0, 1, 2, 3], run_text[:2000]
        assert {node for _, node, _ in placement.values()} == {0}
        assert sorted(local for _, _, local in placement.values()) == [0, 1, 2, 3]
    print(f"\none-node job {one_node_run['job']}: preempted at iteration {preempted_at}, final lm loss "
          f"{one_node_run['metrics'][-1]['lm_loss']!r}")


def test_two_node_job_is_preempted_requeues_and_matches_one_node(two_nodes, one_node_run, tmp_path):
    """2 nodes x 2 processes, placed cyclically (`sbatch --distribution=cyclic`: ranks 0, 2 on the first
    node, 1, 3 on the second) so that each EP=2 group (ranks 0-1, 2-3) spans both nodes and the
    expert-data-parallel groups (0-2, 1-3) stay inside one; the script is the same one a real
    cluster gets. Its loss curve, preempted and resumed, equals the one-node run's exactly."""
    run = _run_preempted(tmp_path, two_nodes, 2, "--distribution=cyclic")
    preempted_at, runs = _check_preempted_and_resumed(run)
    for run_text in runs:
        # the rendezvous: n1 does not resolve on the local cluster, so the script takes its NodeAddr
        header = re.search(r"^job \d+ \(restart \d\) on (\S+), master (\S+):\d+", run_text, re.M)
        assert header, run_text[:2000]
        first = subprocess.run(["scontrol", "show", "hostnames", header.group(1)], capture_output=True, text=True,
                               check=True).stdout.split()[0]
        assert header.group(2) == _rendezvous(first)
        placement = _placement(run_text)
        assert sorted(placement) == [0, 1, 2, 3], run_text[:2000]
        names = {node: name for name, node, _ in placement.values()}
        assert sorted(names) == [0, 1] and len(set(names.values())) == 2
        for rank, (_, node, local) in placement.items():
            assert (node, local) == (rank % 2, rank // 2), placement
    one = [{k: m[k] for k in COMPARED} for m in one_node_run["metrics"]]
    two = [{k: m[k] for k in COMPARED} for m in run["metrics"]]
    assert two == one
    print(f"\ntwo-node job {run['job']}: preempted at iteration {preempted_at}, resumed at {preempted_at + 1}")
    for line in run["log"].splitlines():
        if line.startswith(("job ", "rank ", " saved", " loaded", " exiting", " iteration")):
            print(line)
    print(f"final lm loss: two nodes {two[-1]['lm_loss']!r}, one node {one[-1]['lm_loss']!r}")


def test_megatron_lm_dry_run_names_the_allocated_nodes(two_nodes, tmp_path):
    """The Megatron-LM (GPU) script, run with --dry-run inside a two-node allocation: the rendezvous
    is the first node's NodeAddr (its name does not resolve here), each node's tasks get their ranks."""
    script = _script(["--preset", "switch-base-128-gpt", "--nodes", "2", "--save", "/ckpt",
                      "--megatron-lm", "/opt/Megatron-LM"])
    path = tmp_path / "megatron.sbatch"
    path.write_text(script)
    log = tmp_path / "dry.log"
    job = subprocess.run(["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--output", str(log),
                          "--wrap", f"bash {path} --dry-run"], capture_output=True, text=True, check=False)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    try:
        _wait(job_id, lambda r: r["JobState"] == "COMPLETED", "its dry run finished", str(log))
    finally:
        _cancel_if_alive(job_id)
    text = _read(str(log))
    nodes = subprocess.run(["scontrol", "show", "hostnames", _job(job_id)["NodeList"]], capture_output=True,
                           text=True, check=True).stdout.split()
    master = _rendezvous(nodes[0])
    assert f"dry run: 2 node(s) x 8 task(s), rendezvous {master}:" in text, text
    assert "megatron_switch.megatron_lm.pretrain_gpt" in text and "--exit-signal SIGUSR1" in text
    for n, name in enumerate(nodes):
        assert f"node {n} ({name}):" in text
        for local in range(8):
            assert (f"RANK={8 * n + local} WORLD_SIZE=16 LOCAL_RANK={local} NODE_RANK={n} MASTER_ADDR={master} "
                    in text), text


def test_cpu_script_fits_the_cluster_or_is_refused(slurm, tmp_path, capsys):
    """On the cluster at hand: the default CPU job shares out each node's CPUs among its processes;
    more processes per node than CPUs is refused with the flags that fix it, unless --overcommit;
    more nodes than the partition has is refused too."""
    partition = slurm
    base = ["--preset", "tiny", "--cpu", "--save", str(tmp_path / "ckpt"), "--python", sys.executable]
    for nodes in range(1, partition.nodes + 1):
        script = _script([*base, "--nodes", str(nodes)])
        tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script).group(1))
        cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", script).group(1))
        have = partition.cpus_on(nodes)
        assert f"#SBATCH --nodes={nodes}" in script
        assert tasks == min(2, have) and cpus == have // tasks
    too_many = [*base, "--nodes", "1", "--gpus-per-node", str(2 * partition.cpus_on(1))]
    with pytest.raises(SystemExit) as exit_info:
        sbatch_main(too_many)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{partition.cpus_on(1)} CPU(s) each" in err and "--overcommit" in err
    sbatch_main([*too_many, "--overcommit"])
    script = capsys.readouterr().out  # SLURM refuses --ntasks-per-node above the CPUs even then: --ntasks
    assert "#SBATCH --overcommit" in script and f"#SBATCH --ntasks={2 * partition.cpus_on(1)}\n" in script
    assert "#SBATCH --ntasks-per-node" not in script
    with pytest.raises(SystemExit):
        sbatch_main([*base, "--nodes", str(partition.nodes + 1)])
    assert f"--nodes {partition.nodes} or fewer" in capsys.readouterr().err
