"""benchmarks/fashion_mnist.py: the peers it builds and the table it prints (the runs themselves take minutes)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fashion_mnist as fm  # noqa: E402


def test_small_cnn_is_the_published_two_conv_baseline_size():
    model = fm.build_peer("cnn")
    params = sum(p.numel() for p in model.parameters())
    assert 100_000 <= params <= 500_000  # "~0.1-0.5M parameters", as the pragmatic baseline
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 2
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet18_has_the_cifar_stem():
    model = fm.build_peer("resnet18")
    assert model.conv1.stride == (1, 1) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_peer_and_contestant_are_refused():
    with pytest.raises(ValueError, match="choose from timm, simplevit, resnet18, cnn"):
        fm.build_peer("vgg")
    with pytest.raises(SystemExit):
        fm.main(["--contestants", "vitkit,vgg"])


def test_default_config_follows_the_budget():
    assert fm.default_config("15m").name == "fashion_mnist_15m.yaml"
    assert fm.default_config("1h").name == "fashion_mnist_60m.yaml"
    assert fm.default_config("5m").exists() and fm.default_config("15m").exists()  # the measured recipes


def _result(name, curve, **kw):
    return {"name": name, "params": 1e6, "precision": "bf16", "epochs": len(curve), "curve": curve,
            "final_acc1": curve[-1]["acc1"], "time_to": fm.time_to_targets(curve, 100.0), **kw}


def test_table_ratios_are_peer_time_over_vitkit_time(capsys):
    ours = _result("vitkit", [{"cum_s": 10.0, "acc1": 91.0}, {"cum_s": 20.0, "acc1": 93.5}],
                   model="m", config="c", wall_s=30.0)
    cnn = _result("cnn", [{"cum_s": 15.0, "acc1": 90.5}, {"cum_s": 40.0, "acc1": 92.5}])
    ratios = fm.print_table({"vitkit": ours, "cnn": cnn}, budget_s=100.0)
    # 90%: 15/10; 92%: 40/20; 93%: the CNN missed it in 100 s, so at least 100/20; 94%: nobody reached it.
    assert ratios["cnn"] == {"90": "1.50x", "92": "2.00x", "93": ">= 5.00x", "94": "-"}
    out = capsys.readouterr().out
    assert "small CNN (2 conv blocks) / vitkit" in out and "final evaluation" in out


def test_a_missing_peer_library_is_named_before_anything_runs(monkeypatch, capsys):
    real = fm.importlib.util.find_spec
    monkeypatch.setattr(fm.importlib.util, "find_spec", lambda name: None if name == "vit_pytorch" else real(name))
    with pytest.raises(SystemExit):
        fm.main(["--contestants", "cnn,simplevit"])
    assert 'vit_pytorch not installed: pip install -e ".[bench]"' in capsys.readouterr().err
