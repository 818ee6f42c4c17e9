"""A plain install, as a user installs a plugin: the package without extras in a fresh virtualenv
(torch pinned, the rest from the project's constraints), then a short Switch training job with default
flags. Whatever the trainer does by default must work with the package's own requirements."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _source_copy(dest: Path) -> Path:
    """What `pip install .` needs, copied, so the build writes nothing into the checkout."""
    dest.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "megatron_switch", dest / "megatron_switch", ignore=ignore)
    shutil.copytree(ROOT / "launch", dest / "launch", ignore=ignore)
    return dest


def test_plain_install_trains_with_default_flags(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), "torch==2.13.0",
         str(_source_copy(tmp_path / "src"))], capture_output=True, text=True, check=False)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    for extra in ("matplotlib", "tensorboard", "transformers", "pytest"):  # none of the extras came along
        found = subprocess.run([str(python), "-c", f"import {extra}"], capture_output=True, check=False)
        assert found.returncode != 0, f"{extra} is importable in the plain install"

    save = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONPATH")}
    env.update(MEGATRON_SWITCH_CACHE=str(tmp_path / "cache"), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run([str(bin_dir / "megatron-switch"), "train", "--nproc-per-node", "2",
                           "--expert-model-parallel-size", "2", "--moe-switch", "--num-experts", "4",
                           "--train-iters", "3", "--log-interval", "1", "--save", str(save)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plots skipped: matplotlib is not installed (pip install matplotlib" in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    with open(save / "plots" / "metrics.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2, 3]
