"""The README's main job: a tiny Switch GPT with EP=2 on two local processes learns."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ep2_example_loss_falls():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "switch_gpt_ep2.py"), "--iters", "40",
         "--log-interval", "10"],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"lm loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 5, proc.stdout
    assert losses[-1] < losses[0] - 1.5, losses
    assert "dropped" in proc.stdout and "tokens/s" in proc.stdout
