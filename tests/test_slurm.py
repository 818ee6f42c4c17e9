"""The generated sbatch script on a real SLURM: the tiny preset with 2 CPU tasks trains, saves, gets
the preemption signal, requeues itself and finishes from its checkpoint.

Needs a running cluster (`launch/local_slurm.sh` starts one here). Skipped without one, unless
MEGATRON_SWITCH_REQUIRE_SLURM=1 (CI), which turns a missing cluster into a failure.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_switch.planning.cli import sbatch_main
from megatron_switch.planning.slurm import query_partition

TRAIN_ITERS = 60
POLL_SECONDS = 0.5


def _slurm_ready() -> str | None:
    """None when sbatch works here, else why not."""
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (apt-get install slurm-wlm munge; launch/local_slurm.sh)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, check=False)
    if "UP" not in ping.stdout:
        return f"slurmctld is not running (launch/local_slurm.sh): {ping.stdout.strip()} {ping.stderr.strip()}"
    return None


@pytest.fixture
def slurm():
    problem = _slurm_ready()
    if problem:
        if os.environ.get("MEGATRON_SWITCH_REQUIRE_SLURM") == "1":
            pytest.fail(problem)
        pytest.skip(problem)


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


def test_tiny_job_trains_is_preempted_requeues_and_finishes(slurm, tmp_path):
    save, log = str(tmp_path / "ckpt"), str(tmp_path / "job.log")
    # Two processes (EP=2) on one node of whatever cluster this is: sharing CPUs if its nodes have one.
    partition = query_partition(None)
    assert partition is not None and partition.nodes >= 1, "sinfo lists no usable node in the default partition"
    fit = ["--overcommit"] if partition.cpus_per_node < 2 else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sbatch_main(["--preset", "tiny", "--cpu", "--nodes", "1", "--gpus-per-node", "2", *fit, "--save", save,
                     "--train-iters", str(TRAIN_ITERS), "--save-interval", "10", "--log-interval", "5",
                     "--output", log, "--time", "00:30:00", "--python", sys.executable])
    assert f"fitted to SLURM partition {partition.name!r}" in out.getvalue()
    script = tmp_path / "job.sbatch"
    script.write_text(out.getvalue())
    env = dict(os.environ, MEGATRON_SWITCH_CACHE=str(tmp_path / "cache"))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    submit = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, check=False)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        # Train until the first checkpoint, then preempt: USR1 to the batch script, as --signal=B:USR1 does.
        _wait(job, lambda r: _tracker(save) >= 10, "its first checkpoint", log)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        # The script requeues the job; SLURM starts it again after AuthInfo's cred_expire (10 s on the
        # test node, launch/local_slurm.sh). Releasing it earlier by hand races with the end of the first
        # run (slurmctld then records that run's exit as the job's end: FAILED).
        _wait(job, lambda r: r["JobState"] == "COMPLETED" and int(r.get("Restarts", 0)) >= 1, "it finished", log)
    finally:
        record = _job(job)
        if record is not None and record["JobState"] in ("PENDING", "RUNNING", "SUSPENDED", "REQUEUED"):
            subprocess.run(["scancel", job], check=False)

    text = _read(log)
    stopped = re.search(r"exiting at iteration (\d+) \(signal\)", text)
    assert stopped, text[-4000:]
    preempted_at = int(stopped.group(1))
    assert 10 <= preempted_at < TRAIN_ITERS
    first_run, second_run = text.split("(restart 1)")
    assert f"saved checkpoint {save}/iter_{preempted_at:07d}" in first_run
    assert f"requeued to resume from {save}" in first_run
    assert f"loaded checkpoint {save} at iteration {preempted_at}" in second_run
    logged = [int(i) for i in re.findall(r"iteration\s+(\d+)/\s*\d+", second_run)]
    assert logged and logged[0] > preempted_at and logged[-1] == TRAIN_ITERS  # resumed, not restarted
    assert f"latest checkpoint at iteration {TRAIN_ITERS} of {TRAIN_ITERS}" in second_run
    assert "requeued" not in second_run
    assert _tracker(save) == TRAIN_ITERS
    assert os.path.isfile(os.path.join(save, f"iter_{TRAIN_ITERS:07d}", "metadata.json"))
    assert record is not None and record["JobState"] == "COMPLETED" and record["Restarts"] == "1", record


def test_cpu_script_fits_the_cluster_or_is_refused(slurm, tmp_path, capsys):
    """On the cluster at hand: the default CPU job shares out each node's CPUs among its processes;
    more processes per node than CPUs is refused with the flags that fix it, unless --overcommit."""
    partition = query_partition(None)
    base = ["--preset", "tiny", "--cpu", "--nodes", "1", "--save", str(tmp_path / "ckpt"), "--python", sys.executable]
    sbatch_main(base)
    script = capsys.readouterr().out
    tasks = int(re.search(r"#SBATCH --ntasks-per-node=(\d+)", script).group(1))
    cpus = int(re.search(r"#SBATCH --cpus-per-task=(\d+)", script).group(1))
    assert tasks == min(2, partition.cpus_per_node) and cpus == partition.cpus_per_node // tasks
    too_many = [*base, "--gpus-per-node", str(2 * partition.cpus_per_node)]
    with pytest.raises(SystemExit) as exit_info:
        sbatch_main(too_many)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{partition.cpus_per_node} CPU(s) each" in err and "--overcommit" in err
    sbatch_main([*too_many, "--overcommit"])
    assert "#SBATCH --overcommit" in capsys.readouterr().out
