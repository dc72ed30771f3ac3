"""Checks that need a CUDA device: skipped on CPU machines, run by benchmarks/gpu_check.sh.

Each compares the GPU path with something known: the CPU forward pass of the same weights, a real
training run's accuracy, eager against compiled steps.
"""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import vitkit
from vitkit.benchmark import train_step
from vitkit.engine import Runtime
from vitkit.models import get_model_entry, list_models

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# One small variant of each family the registry knows at a laptop size.
SMALL = [n for n in list_models() if any(s in n for s in ("_pico_", "_nano_"))]


@pytest.mark.parametrize("name", SMALL)
def test_cuda_forward_matches_the_cpu(name):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = vitkit.create_model(name).eval()
    cfg = get_model_entry(name).config
    side = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
    x = torch.randn(4, cfg.in_chans, side, side)
    with torch.no_grad():
        ref = model(x)
        out = model.cuda()(x.cuda()).cpu()
    assert (out - ref).abs().max().item() < 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_training_learns_digits(tmp_path, precision):
    out = tmp_path / precision
    vitkit.train(vitkit.TrainConfig(data="digits", img_size=16, epochs=6, batch_size=64, num_workers=0,
                                    device="cuda", precision=precision, out=str(out)))
    acc = json.loads((out / "eval.json").read_text())["acc1"]
    assert acc > 85.0, acc
    assert vitkit.load_run(out, device="cuda").predict([Image.new("L", (16, 16))])  # reloads on the GPU


def test_fp16_steps_use_the_gradient_scaler():
    model = vitkit.create_model("vit_pico_conv4_28").cuda()
    runtime = Runtime("cuda", "fp16")
    x, y = torch.randn(8, 1, 28, 28, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    step = train_step(model, x, y, runtime)
    for _ in range(3):
        step()
    assert runtime.scaler is not None and runtime.scaler.get_scale() > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_cuda_step_matches_eager():
    torch.manual_seed(0)
    eager = vitkit.create_model("vit_pico_conv4_28").cuda().train()
    compiled = vitkit.create_model("vit_pico_conv4_28").cuda().train()
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(8, 1, 28, 28, device="cuda")
    a = eager(x)
    b = torch.compile(compiled)(x)
    assert (a - b).abs().max().item() < 1e-4


def test_benchmark_command_on_cuda():
    out = subprocess.run([sys.executable, "-m", "vitkit", "benchmark", "--model", "vit_pico_conv4_28",
                          "--device", "cuda", "--steps", "3", "--precision", "bf16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "train bf16" in out.stdout and "infer bf16" in out.stdout
