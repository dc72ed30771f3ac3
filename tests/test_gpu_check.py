"""The CPU side of benchmarks/gpu_check.sh and gpu_check.py: what can be checked without a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import gpu_check  # noqa: E402
from harness import run_curve, time_to_targets  # noqa: E402


def test_time_to_targets_sums_epoch_times_and_takes_raw_or_ema():
    rows = [{"epoch": 0, "time_s": 10.0, "val_acc1": 85.0, "val_acc1_ema": 89.0},
            {"epoch": 1, "time_s": 12.0, "val_acc1": 91.0, "val_acc1_ema": 92.5},
            {"epoch": 2, "time_s": 11.0, "val_acc1": 93.2, "val_acc1_ema": None}]
    curve = run_curve(rows)
    assert time_to_targets(curve) == {"90": 22.0, "92": 22.0, "93": 33.0, "94": None}
    assert time_to_targets(curve, budget_s=30.0) == {"90": 22.0, "92": 22.0, "93": None, "94": None}


def test_throughput_logic_runs_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "t.json"
    result = gpu_check.main(["throughput", "--device", "cpu", "--smoke", "--batch", "2", "--rounds", "1",
                             "--json", str(out)])
    assert set(result["vitkit_over_timm"]) == {"train bf16", "train fp32", "infer bf16", "infer fp32"}
    assert all(v > 0 for v in result["images_per_s"].values())
    assert json.loads(out.read_text())["model"] == "vit_small_patch16_224"
    assert "vitkit/timm infer fp32" in capsys.readouterr().out


def test_fashion_logic_reports_time_to_targets(tmp_path, capsys):
    result = gpu_check.main(["fashion", "--device", "cpu", "--data", "digits", "--epochs", "1",
                             "--model", "vit_pico_conv4_28", "--out", str(tmp_path / "run")])
    assert result["epochs"] == 1 and result["final_acc1"] is not None
    assert set(result["time_to"]) == {"90", "92", "93", "94"}
    assert "time to 93%" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_the_script_says_plainly_that_it_needs_a_gpu(tmp_path):
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(tmp_path / "out")], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.main(["throughput"])
