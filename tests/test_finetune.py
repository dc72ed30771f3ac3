"""Fine-tuning modes of a pretrained backbone: LoRA through PEFT (adapters merged into plain weights when
the run is saved, the adapter alone beside them) and the linear probe (tests/test_recipe.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vitkit
import vitkit.run as vrun
from vitkit import TrainConfig, train
from vitkit.cli import main
from vitkit.export import export_run

peft = pytest.importorskip("peft")

# A ViT-S/16 at full width and 4 blocks on 32 px digits (a 2x2 grid): LoRA's share is that of the real model.
BACKBONE = dict(model="vit_small_patch16_224", model_args=dict(depth=4), img_size=32)
FAST = dict(data="digits", epochs=2, batch_size=64, warmup_epochs=0, num_workers=0, train_subset=500)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    src = train(TrainConfig(**FAST, **BACKBONE, ema=None, out=str(root / "src")))
    run = train(TrainConfig(**FAST, pretrained=str(src), img_size=32, finetune="lora", lora_rank=8,
                            out=str(root / "lora")))
    return src, run


def test_lora_trains_few_parameters_and_saves_merged_weights(lora_runs, capsys):
    src, run = lora_runs
    a, b = load_file(src / vrun.WEIGHTS), load_file(run / vrun.WEIGHTS)
    assert set(a) == set(b)  # plain names: no adapter keys, nothing missing
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("attn.qkv.weight") or k.startswith("head.") for k in changed)
    # The adapter alone, in PEFT's format: rank-8 A and B for each of the 4 qkv layers, and the classifier.
    adapter = load_file(run / "adapter_model.safetensors")
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["target_modules"] == ["qkv"] and config["peft_type"] == "LORA"
    lora = {k: v for k, v in adapter.items() if "lora_" in k}
    assert len(lora) == 8 and all(8 in v.shape for v in lora.values())
    trainable = sum(v.numel() for v in adapter.values())
    total = sum(v.numel() for v in a.values())
    assert trainable / total < 0.05, trainable / total  # ViT-S: 1.4%
    # The merged weight is the base plus (alpha / r) B A.
    for i in range(4):
        key = f"blocks.{i}.attn.qkv"
        B, A = adapter[f"{key}.lora_B.weight"], adapter[f"{key}.lora_A.weight"]
        assert torch.allclose(b[f"{key}.weight"], a[f"{key}.weight"] + 2.0 * B @ A, atol=1e-6)


def test_a_lora_run_evaluates_and_exports_like_any_run(lora_runs, tmp_path):
    _, run = lora_runs
    expected = json.loads((run / vrun.EVAL).read_text())["acc1"]
    assert main(["eval", str(run), "--out", str(tmp_path / "report")]) == 0  # the record and merged weights only
    assert json.loads((run / vrun.EVAL).read_text())["acc1"] == pytest.approx(expected, abs=1e-6)
    assert expected > 30  # one epoch from a one-epoch backbone: better than chance (10%)
    out = export_run(run, "onnx", tmp_path / "onnx")
    assert out.max_abs_diff <= 1e-4  # ONNX parity with the merged PyTorch model
    assert json.loads(out.preprocess_file.read_text())["classes"] == vitkit.load_run(run).classes


def test_lora_flags_are_checked():
    with pytest.raises(ValueError, match="finetune='lora' is invalid: must be full without --pretrained"):
        TrainConfig(finetune="lora")
    with pytest.raises(ValueError, match="lora_rank=0 is invalid"):
        TrainConfig(finetune="lora", pretrained="x", lora_rank=0)


def test_unknown_lora_target_names_the_model_layers(lora_runs, tmp_path):
    src, _ = lora_runs
    with pytest.raises(ValueError, match="--lora_targets query: no linear layer of that name; this model has fc1, fc2, "
                                         "head, proj, qkv"):
        train(TrainConfig(**FAST, pretrained=str(src), img_size=32, finetune="lora", lora_targets=["query"],
                          out=str(tmp_path / "bad")))
