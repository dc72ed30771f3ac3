"""A training process killed with SIGKILL mid-epoch resumes to the uninterrupted run's weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["--data", "digits", "--epochs", "4", "--warmup-epochs", "1", "--batch-size", "32"]
RUNS = {  # one loop for every objective: classification and pre-training resume alike
    "train": ["train", *COMMON],
    "pretrain": ["pretrain", "--method", "mae", *COMMON, "--img-size", "16", "--ema", "0.99", "--accum-steps", "2"],
}


def _vitkit(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "vitkit.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("command", sorted(RUNS))
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, command):
    args = RUNS[command]
    full = _vitkit(*args, "--out", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stdout.read()

    cut_dir = tmp_path / "cut"
    cut = _vitkit(*args, "--out", str(cut_dir))
    deadline = time.time() + 300
    # Wait for the first epoch's checkpoint, then kill part-way through the second epoch.
    while not (cut_dir / "checkpoint.pt").exists():
        assert cut.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    first_epoch_s = json.loads((cut_dir / "metrics.jsonl").read_text().splitlines()[0])["time_s"]
    time.sleep(first_epoch_s / 3)
    cut.send_signal(signal.SIGKILL)
    assert cut.wait(timeout=30) == -signal.SIGKILL
    metrics = (cut_dir / "metrics.jsonl").read_text().splitlines()
    assert 1 <= len(metrics) < 4, "the kill did not land mid-run"

    resumed = _vitkit(command, "--resume", str(cut_dir))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming" in out
    for weights in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(tmp_path / "full" / weights), load_file(cut_dir / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    assert len((cut_dir / "metrics.jsonl").read_text().splitlines()) == 4
