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
    assert trainable / total < 0.05, trainable / total  # 4-block ViT-S, rank 8: 0.72%
    # The merged weight is the base plus (alpha / r) B A.
    for i in range(4):
        key = f"blocks.{i}.attn.qkv"
        B, A = adapter[f"{key}.lora_B.weight"], adapter[f"{key}.lora_A.weight"]
        assert torch.allclose(b[f"{key}.weight"], a[f"{key}.weight"] + 2.0 * B @ A, atol=1e-6)


def test_a_lora_run_evaluates_exports_explains_and_serves_like_any_run(lora_runs, tmp_path):
    _, run = lora_runs
    expected = json.loads((run / vrun.EVAL).read_text())["acc1"]
    assert main(["eval", str(run), "--out", str(tmp_path / "report")]) == 0  # the record and merged weights only
    assert json.loads((run / vrun.EVAL).read_text())["acc1"] == pytest.approx(expected, abs=1e-6)
    assert expected > 30  # one epoch from a one-epoch backbone: better than chance (10%)
    out = export_run(run, "onnx", tmp_path / "onnx")
    assert out.max_abs_diff <= 1e-4  # ONNX parity with the merged PyTorch model
    assert json.loads(out.preprocess_file.read_text())["classes"] == vitkit.load_run(run).classes
    # explain: rollout maps over the image; serve: the predictor answers with the run's probabilities and maps.
    from PIL import Image

    Image.new("L", (16, 16), 128).save(tmp_path / "grey.png")
    assert main(["explain", str(run), str(tmp_path / "grey.png"), "--out", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "grey_rollout.png").exists()
    from vitkit.serve import load_predictor

    predictor = load_predictor(run)
    x = vitkit.load_run(run).preprocess([tmp_path / "grey.png"])
    probs, maps = predictor(x, attention=True)
    with torch.no_grad():
        ref = vitkit.load_run(run).model(x).softmax(-1)
    assert predictor.has_attention and maps.shape[0] == 1 and torch.allclose(probs, ref, atol=1e-5)


@pytest.mark.slow  # ~25 s: one more LoRA run; exact resume itself is in the default suite (test_kill_resume.py)
def test_an_interrupted_lora_run_resumes_to_the_uninterrupted_weights(lora_runs, tmp_path, monkeypatch):
    """Killed after its first epoch's checkpoint, the LoRA run resumes (adapters re-injected, their state
    restored) to the very weights of the run that was not stopped: merged model and adapter alike."""
    from conftest import train_interrupted_after_first_epoch

    src, full = lora_runs
    train_interrupted_after_first_epoch(monkeypatch, TrainConfig(**FAST, pretrained=str(src), img_size=32,
                                                                 finetune="lora", lora_rank=8, out=str(tmp_path / "cut")))
    assert len(vrun.read_metrics(tmp_path / "cut")) == 1
    train(TrainConfig(resume=str(tmp_path / "cut")))
    for weights in (vrun.WEIGHTS, "adapter_model.safetensors"):
        a, b = load_file(full / weights), load_file(tmp_path / "cut" / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


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


def test_lora_qkv_means_the_separate_projections_where_a_model_keeps_them_apart():
    from vitkit.engine.objectives.lora import add_lora

    model = vitkit.create_model("eva02_base_patch14_224", num_classes=5, img_size=28, embed_dim=48, depth=2,
                                num_heads=2)
    assert add_lora(model, 4, 8, 0.0, ["qkv"])["target_modules"] == ["k_proj", "q_proj", "v_proj"]
    trainable = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert trainable == {f"blocks.{i}.attn.{t}" for i in range(2) for t in ("q_proj", "k_proj", "v_proj")}


# -- embeddings -------------------------------------------------------------------------------------
def test_embed_writes_one_row_per_image_in_order(lora_runs, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    _, run = lora_runs
    rng = np.random.default_rng(0)
    files = []
    for i in range(5):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(files[-1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    # Batches of 2: the rows of three forward passes, in the order of the files.
    assert main(["embed", str(run), *map(str, files), str(tmp_path / "broken.png"), "--out",
                 str(tmp_path / "e.npy"), "--batch_size", "2"]) == 1  # the broken image is skipped, and said
    emb = np.load(tmp_path / "e.npy")
    assert (tmp_path / "e.txt").read_text().split() == [str(f) for f in files]
    loaded = vitkit.load_run(run)
    with torch.no_grad():
        x = loaded.preprocess(files)
        ref = loaded.model.forward_head(loaded.model.forward_features(x), pre_logits=True)
    assert emb.shape == (5, 384) and np.abs(emb - ref.numpy()).max() <= 1e-5
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["embed", str(run), *map(str, files), "--out", str(tmp_path / "e.parquet")]) == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.column("file").to_pylist() == [str(f) for f in files]
    assert np.abs(np.array(table.column("embedding").to_pylist()) - emb).max() <= 1e-6
    assert main(["embed", str(run), str(files[0]), "--out", str(tmp_path / "e.csv")]) == 2
    assert "write embeddings to a .npy or .parquet file" in capsys.readouterr().err


# -- k-NN on frozen features ------------------------------------------------------------------------
def test_knn_scores_by_hand():
    from vitkit.engine.objectives.knn import knn_scores

    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[0.6, 0.8]])  # cosines 0.6, 0.96, 0.8 with the bank
    s = knn_scores(q, bank, labels, num_classes=3, k=2, temperature=0.5)  # neighbours 1 and 2, both class 1
    assert torch.allclose(s, torch.tensor([[0.0, torch.tensor(0.96 / 0.5).exp() + torch.tensor(0.8 / 0.5).exp(), 0.0]]))
    s = knn_scores(q, bank, labels, num_classes=3, k=5, temperature=1.0)  # k beyond the bank: all three vote
    assert torch.allclose(s[0, :2], torch.tensor([0.6, 0.96]).exp() + torch.tensor([0.0, 0.8]).exp() * torch.tensor([0, 1]))


def test_knn_run_reports_top1_without_training(lora_runs, tmp_path, capsys):
    src, _ = lora_runs
    run = train(TrainConfig(**FAST, pretrained=str(src), img_size=32, finetune="knn", out=str(tmp_path / "knn")))
    ev = json.loads((run / vrun.EVAL).read_text())
    assert ev["knn_k"] == 20 and 490 <= ev["bank"] <= 500 and ev["n"] == 360  # the 500-image training subset
    assert ev["acc1"] > 30  # chance: 10%
    assert vrun.read_metrics(run) == []  # no epochs
    record = vrun.RunRecord.read(run)
    assert not record.ema and record.settings["ema"] is None and not (run / "model_ema.safetensors").exists()
    a, b = load_file(src / vrun.WEIGHTS), load_file(run / vrun.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))  # the backbone as it came
    assert "k-NN baseline" in (run / "README.md").read_text()
    assert main(["eval", str(run)]) == 2
    assert "is a k-NN evaluation: it has no trained classifier" in capsys.readouterr().err
