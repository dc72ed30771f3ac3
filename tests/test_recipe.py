"""The training recipe: augmentation presets, Mixup/CutMix, EMA, layer decay, accumulation,
activation checkpointing, test-time flips, fine-tuning and torchrun."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitkit
from vitkit.cli import main
from vitkit.data import BatchMix, TensorLoader, load_data, resolve_augment
import vitkit.run as vrun
from vitkit.engine import TrainConfig, evaluate, train
from vitkit.run import load_run
from vitkit.engine.ema import create_ema, ema_decay
from vitkit.engine.optim import create_optimizer, layer_ids, param_groups, set_lr
from vitkit.engine.runtime import Runtime

FAST = dict(data="digits", model="vit_pico_conv4_28", img_size=16, epochs=1, batch_size=64, warmup_epochs=0, ema=None)


# -- augmentation ---------------------------------------------------------------------------------


def test_presets_and_overrides():
    assert resolve_augment("light").policy == "none" and resolve_augment("light").mixup == 0
    strong = resolve_augment("strong")
    assert (strong.policy, strong.random_erasing, strong.mixup, strong.cutmix) == ("randaugment", 0.25, 0.8, 1.0)
    assert resolve_augment("strong", mixup=0.0, policy="trivialaugment").mixup == 0.0
    with pytest.raises(ValueError, match="light"):
        resolve_augment("heavy")


@pytest.mark.parametrize("preset", ["none", "light", "medium", "strong"])
def test_tensor_loader_presets_keep_shapes_and_labels(preset):
    d = load_data("digits")
    loader = TensorLoader(d.train, batch_size=16, img_size=(16, 16), mean=d.mean, std=d.std, train=True,
                          augment=resolve_augment(preset), hflip=preset != "none", seed=1)
    x, y = next(iter(loader))
    assert x.shape == (16, 1, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (16,) and y.dtype == torch.long
    plain = TensorLoader(d.train, batch_size=16, img_size=(16, 16), mean=d.mean, std=d.std, train=True, augment="none", seed=1)
    x0, y0 = next(iter(plain))
    assert torch.equal(y, y0)  # same order: augmentation changes pixels, never labels
    assert torch.equal(x, x0) == (preset == "none")


def test_per_image_policy_differs_between_images():
    d = load_data("digits")
    kw = dict(batch_size=64, img_size=(16, 16), mean=d.mean, std=d.std, train=True, seed=0)
    x_pol = next(iter(TensorLoader(d.train, augment=resolve_augment("none", policy="trivialaugment"), **kw)))[0]
    x_raw = next(iter(TensorLoader(d.train, augment="none", **kw)))[0]
    changed = (x_pol != x_raw).flatten(1).any(1)
    assert 0 < changed.sum() < 64  # each image drew its own op (identity is one of them)


def test_mixup_cutmix_mix_labels_into_probabilities():
    torch.manual_seed(0)
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 4, 4).clone()
    y = torch.arange(8) % 4
    xm, ym = BatchMix(4, mixup=0.8)(x, y)
    assert ym.shape == (8, 4) and torch.allclose(ym.sum(1), torch.ones(8))
    lam = ym[0, y[0]].item() if y[0] != y[-1] else None
    # Mixup pairs each image with its neighbour in the batch (torchvision rolls by one).
    if lam is not None:
        assert torch.allclose(xm[0], lam * x[0] + (1 - lam) * x[-1], atol=1e-6)
    _, yc = BatchMix(4, cutmix=1.0)(x, y)
    assert torch.allclose(yc.sum(1), torch.ones(8)) and (yc.max(1).values < 1).any()
    with pytest.raises(ValueError):
        BatchMix(4)


def test_soft_target_loss_equals_mixed_hard_losses():
    from vitkit.engine import classification_loss

    logits, a, b, lam = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.tensor([1, 2, 0, 0, 2]), 0.3
    soft = lam * torch.nn.functional.one_hot(a, 3) + (1 - lam) * torch.nn.functional.one_hot(b, 3)
    want = lam * classification_loss(logits, a) + (1 - lam) * classification_loss(logits, b)
    assert classification_loss(logits, soft.float()).item() == pytest.approx(want.item(), rel=1e-6)


# -- EMA, layer decay, accumulation, checkpointing, TTA -------------------------------------------


def test_ema_follows_the_warmed_up_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = create_ema(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # first update copies
    expected = 1.0
    for step, value in enumerate([3.0, -1.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update_parameters(model)
        d = ema_decay(0.9, step + 1)
        expected = d * expected + (1 - d) * value
        assert torch.allclose(ema.module.weight, torch.full((1, 2), expected))
    assert ema_decay(0.9, 1) == pytest.approx(2 / 11) and ema_decay(0.9, 10**6) == 0.9


def test_ema_keeps_integer_buffers():
    model = vitkit.create_model("swin_pico_patch2_window4_32")
    ema = create_ema(model, 0.99)
    ema.update_parameters(model)
    ema.update_parameters(model)
    for (n, a), b in zip(model.named_buffers(), ema.module.buffers()):
        assert torch.equal(a, b), n


def test_layer_decay_groups_scale_by_depth():
    model = vitkit.create_model("vit_pico_conv4_28")
    ids, L = layer_ids(model)
    assert L == 4 and ids["patch_embed.stem.0.weight"] == 0 and ids["blocks.0.attn.qkv.weight"] == 1
    assert ids["blocks.3.mlp.fc2.weight"] == 4 and ids["head.weight"] == 5
    opt = create_optimizer(model, 1e-3, 0.05, layer_decay=0.5)
    set_lr(opt, 1e-3)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["head.weight"])] == pytest.approx(1e-3)
    assert lr_of[id(named["blocks.3.attn.qkv.weight"])] == pytest.approx(5e-4)
    assert lr_of[id(named["blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5**4)
    assert lr_of[id(named["patch_embed.stem.0.weight"])] == pytest.approx(1e-3 * 0.5**5)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(named["blocks.0.norm1.weight"])] == 0 and wd[id(named["blocks.0.attn.qkv.weight"])] == 0.05
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    assert len(param_groups(model, 0.05)) == 2  # no decay: the two plain groups


@pytest.mark.parametrize("name, L", [("swin_pico_patch2_window4_32", 6), ("cvt_pico_28", 5), ("beit_pico_patch4_28", 4)])
def test_layer_ids_cover_every_family(name, L):
    ids, n = layer_ids(vitkit.create_model(name))
    assert n == L and set(ids.values()) == set(range(L + 2))


def test_grad_accumulation_matches_the_large_batch(tmp_path):
    # The patch-embedding model: the conv stem's BatchNorm would see 32-image statistics. A small lr:
    # Adam turns rounding noise in near-zero gradients (e.g. the key bias, whose true gradient is 0)
    # into steps of size ~lr, so the two summation orders drift apart in proportion to lr.
    common = {**FAST, "model": "vit_pico_patch4_28", "augment": "none", "clip_grad": None, "lr": 3e-4, "precision": "fp32"}
    big = train(TrainConfig(**common, out=str(tmp_path / "big")))
    acc = train(TrainConfig(**{**common, "batch_size": 32}, accum_steps=2, out=str(tmp_path / "acc")))
    a, b = load_file(big / vrun.WEIGHTS), load_file(acc / vrun.WEIGHTS)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("name, size", [("vit_pico_conv4_28", 28), ("swin_pico_patch2_window4_32", 32), ("cvt_pico_28", 28)])
def test_grad_checkpointing_gives_the_same_gradients(name, size):
    rate = (0.0, 0.1, 0.1) if name.startswith("cvt") else 0.1  # with stochastic depth: the recomputation replays its RNG
    model = vitkit.create_model(name, in_chans=3, drop_path_rate=rate).train()
    x = torch.randn(2, 3, size, size)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        torch.manual_seed(0)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
    names = vitkit.models.contract.transformer_block_names(model)
    assert names and all("forward" in model.get_submodule(n).__dict__ for n in names)
    model.set_grad_checkpointing(False)
    assert not any("forward" in model.get_submodule(n).__dict__ for n in names)


def test_tta_flip_averages_image_and_mirror():
    model = vitkit.create_model("vit_pico_conv4_28", num_classes=3, in_chans=1).eval()
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    out = evaluate(model, [(x, y)], Runtime("cpu"), tta_flip=True, return_outputs=True)
    with torch.no_grad():
        want = (model(x) + model(x.flip(-1))) / 2
    assert torch.allclose(out["logits"], want, atol=1e-6)


def test_tta_views_are_mirrors_and_one_pixel_shifts():
    from vitkit.engine.evaluate import tta_view_count, tta_views

    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float).view(2, 1, 5, 6)
    views = tta_views(x, flip=True, shift=1)
    assert len(views) == 10 and all(v.shape == x.shape for v in views)
    assert torch.equal(views[0], x) and torch.equal(views[5], x.flip(-1))
    down = views[1]  # content moved by one row, the edge row repeated
    assert torch.equal(down[..., :-1, :], x[..., 1:, :]) and torch.equal(down[..., -1, :], x[..., -1, :])
    assert torch.equal(views[4][..., 1:], x[..., :-1]) and torch.equal(views[4][..., 0], x[..., 0])
    assert len(tta_views(x)) == 1 and len(tta_views(x, shift=1)) == 5 and len(tta_views(x, flip=True)) == 2
    assert [tta_view_count(f, s) for f, s in ((0, 0), (1, 0), (0, 1), (1, 1))] == [1, 2, 5, 10]

    model = vitkit.create_model("vit_pico_conv4_28", num_classes=3, in_chans=1).eval()
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 0, 1, 2])
    out = evaluate(model, [(x, y)], Runtime("cpu"), tta_shift=1, return_outputs=True)
    with torch.no_grad():
        want = sum(model(v) for v in tta_views(x, shift=1)) / 5
    assert torch.allclose(out["logits"], want, atol=1e-6)


def test_auto_precision_follows_the_measurements():
    from vitkit.engine.runtime import auto_precision, cpu_has_bf16

    # bf16 measured faster for ViTs of every size on bf16 CPUs, slower for CvT's depthwise convolutions.
    bf16 = "bf16" if cpu_has_bf16() else "fp32"
    for name in ("vit_pico_conv4_28", "vit_small_patch16_224", "swin_pico_patch2_window4_32"):
        assert auto_precision("cpu", vitkit.create_model(name)) == bf16, name
    assert auto_precision("cpu", vitkit.create_model("cvt_pico_28")) == "fp32"


# -- fine-tuning ----------------------------------------------------------------------------------


def _three_class_folder(root: Path) -> Path:
    d = load_data("digits")
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i, idx in enumerate((d.train.labels == c).nonzero().flatten()[:20].tolist()):
            Image.fromarray(d.train.images[idx, 0].numpy()).save(root / f"c{c}" / f"{i}.png")
    return root


def test_fine_tuning_a_run_resets_the_head_and_keeps_the_backbone(tmp_path):
    src = train(TrainConfig(**FAST, out=str(tmp_path / "src")))
    folder = _three_class_folder(tmp_path / "three")
    base = load_file(src / vrun.WEIGHTS)
    tuned = vitkit.create_model("vit_pico_conv4_28", pretrained=str(src), num_classes=3, in_chans=1, img_size=16)
    sd = tuned.state_dict()
    assert sd["head.weight"].shape == (3, 96) and base["head.weight"].shape == (10, 96)
    assert all(torch.equal(sd[k], v) for k, v in base.items() if not k.startswith("head."))

    # From the CLI: the model comes from the run, with the fine-tuning defaults.
    assert main(["train", "--pretrained", str(src), "--data", str(folder), "--epochs", "1", "--batch-size", "16",
                 "--warmup-epochs", "0", "--out", str(tmp_path / "ft")]) == 0
    rec = vrun.RunRecord.read(tmp_path / "ft")
    assert rec.model == "vit_pico_conv4_28" and rec.classes == ["c0", "c1", "c2"]
    assert rec.settings["lr"] == 5e-4 and rec.settings["layer_decay"] == 0.75
    assert rec.mean == vrun.RunRecord.read(src).mean  # the weights' normalisation
    assert load_run(tmp_path / "ft").model.head.weight.shape == (3, 96)

    # A head of the right size for other classes starts afresh; the same classes keep theirs.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for i, c in enumerate("xyz"):
        (folder / f"c{i}").rename(renamed / c)
    again = dict(**{**FAST, "model": None, "data": str(renamed)}, pretrained=str(tmp_path / "ft"))
    with pytest.warns(UserWarning, match="classifies c0, c1, c2, ..., not this data's x, y, z, ...: re-initialising"):
        train(TrainConfig(**again, out=str(tmp_path / "other")))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*re-initialising the classifier")
        train(TrainConfig(**{**again, "pretrained": str(tmp_path / "other")}, out=str(tmp_path / "same")))


def test_pretrained_weights_file_needs_a_model_name(tmp_path):
    with pytest.raises(ValueError, match="--model must name"):
        train(TrainConfig(**{**FAST, "model": None}, pretrained=str(tmp_path / "w.safetensors"), out=str(tmp_path / "r")))


def test_ema_weights_are_saved_and_used_by_load_run(tmp_path):
    run_dir = train(TrainConfig(**{**FAST, "ema": 0.99}, out=str(tmp_path / "ema")))
    row = vrun.read_metrics(run_dir)[-1]
    assert {"val_acc1_ema", "val_loss_ema"} <= set(row)
    ema, raw = load_file(run_dir / vrun.EMA_WEIGHTS), load_file(run_dir / vrun.WEIGHTS)
    assert not torch.equal(ema["head.weight"], raw["head.weight"])
    assert torch.equal(load_run(run_dir).model.head.weight, ema["head.weight"])
    assert torch.equal(load_run(run_dir, weights="raw").model.head.weight, raw["head.weight"])
    # --pretrained RUN (and convert) start from the weights the run evaluated: its EMA.
    assert torch.equal(vitkit.create_model(pretrained=str(run_dir)).head.weight, ema["head.weight"])


# -- torchrun -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchrun_runs(tmp_path_factory):
    """One epoch on digits at 16 px with the same global batch of 64, run once for the tests below: one process,
    and torchrun with gloo on CPU, 2 x 32, replicated (ddp) and sharded with activation checkpointing (fsdp)."""
    root = tmp_path_factory.mktemp("torchrun")
    # vit_pico_patch4_28 has no BatchNorm, whose batch statistics are per process; lr as above.
    args = ["train", "--model", "vit_pico_patch4_28", "--data", "digits", "--img-size", "16", "--epochs", "1", "--warmup-epochs", "0.5", "--lr", "3e-4", "--device", "cpu",
            "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp", "--grad-checkpointing"])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "-m", "vitkit", *args, "--batch-size", "32", *extra, "--out", str(root / name)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    assert main([*args, "--batch-size", "64", "--out", str(root / "one")]) == 0
    return root


def _max_difference(a: Path, b: Path, file: str) -> float:
    wa, wb = load_file(a / file), load_file(b / file)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(torchrun_runs):
    """2 x 32 images per step end where 1 x 64 does (same data order, same augmentation draws, gradients
    averaged by DDP)."""
    ddp, one = torchrun_runs / "ddp", torchrun_runs / "one"
    for f in (vrun.WEIGHTS, vrun.EMA_WEIGHTS):
        assert _max_difference(ddp, one, f) < 1e-5, f
    ra, rb = vrun.read_metrics(ddp), vrun.read_metrics(one)
    assert ra[-1]["val_acc1"] == pytest.approx(rb[-1]["val_acc1"], abs=0.3)  # metrics reduced over both ranks
    assert vrun.RunRecord.read(ddp).world_size == 2


def test_fsdp_ends_where_ddp_does_and_its_run_loads_without_fsdp(torchrun_runs):
    """FSDP2 (each block a shard unit, recomputed in the backward) ends within 1e-5 of DDP, raw and EMA weights;
    what it saved are whole, plain tensors: the checkpoint has DDP's layout and the run predicts in one process."""
    fsdp, ddp = torchrun_runs / "fsdp", torchrun_runs / "ddp"
    for f in (vrun.WEIGHTS, vrun.EMA_WEIGHTS):
        assert _max_difference(fsdp, ddp, f) < 1e-5, f
    ours, theirs = vrun.load_checkpoint(fsdp / vrun.CHECKPOINT), vrun.load_checkpoint(ddp / vrun.CHECKPOINT)
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    for k, moments in theirs["optimizer"]["state"].items():
        for name, v in moments.items():
            assert type(ours["optimizer"]["state"][k][name]) is torch.Tensor
            assert torch.allclose(ours["optimizer"]["state"][k][name], v, atol=1e-5), (k, name)
    assert all(type(v) is torch.Tensor for part in ("objective", "ema") for v in ours[part].values())
    assert vrun.read_metrics(fsdp)[-1]["val_acc1"] == pytest.approx(vrun.read_metrics(ddp)[-1]["val_acc1"], abs=0.3)
    record = vrun.RunRecord.read(fsdp)  # `--fsdp` given bare, as `--compile` is
    assert record.world_size == 2 and record.settings["fsdp"] and record.settings["grad_checkpointing"]
    image = Image.fromarray((load_data("digits").val.images[0, 0]).numpy())
    assert len(load_run(fsdp).predict([image], topk=3)[0]) == 3


def test_resuming_an_fsdp_run_cuts_its_whole_checkpoint_into_shards(torchrun_runs):
    """The finished run resumed under torchrun (its config says fsdp): no epoch is left, so the checkpoint is
    loaded into the shards and the final evaluation of the EMA weights runs again, to the same numbers."""
    fsdp = torchrun_runs / "fsdp"
    before = json.loads((fsdp / vrun.EVAL).read_text())
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vitkit", "train", "--resume", str(fsdp)],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    after = json.loads((fsdp / vrun.EVAL).read_text())
    assert after["weights"] == "ema" and {k: after[k] for k in ("loss", "acc1", "n")} == {k: before[k] for k in ("loss", "acc1", "n")}


def test_fsdp_settings_that_cannot_shard_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"fsdp=True is invalid: must be false with --precision fp16 \(use --precision bf16\)"):
        TrainConfig(fsdp=True, precision="fp16")
    with pytest.raises(ValueError, match="fsdp=True is invalid: must be false with --finetune lora or knn"):
        TrainConfig(fsdp=True, finetune="lora", pretrained="x")
    # One process has nothing to shard: the same command (or a resumed FSDP run) trains unsharded, saying so once.
    with pytest.warns(UserWarning, match="--fsdp: one process"):
        runtime = Runtime("cpu", "fp32", fsdp=True, distributed=True)
    model = torch.nn.Linear(2, 2)
    state = model.state_dict()
    assert not runtime.fsdp and runtime.wrap(model) is model and runtime.full_state(state) is state


# -- shipped recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_parse_and_name_real_models(path):
    from vitkit.cli import build_parser, train_config
    from vitkit.models import model_config

    text = path.read_text()
    assert all(k in text for k in ("# Command:", "# Hardware:", "# Expected:")), "a recipe states command, hardware, result"
    cfg = train_config(build_parser().parse_args(["train", "--config", str(path)])["train"])
    model_config(cfg.model or "vit_pico_conv4_28", **cfg.model_args)


def test_linear_probe_trains_only_the_classifier(tmp_path):
    src = train(TrainConfig(**{**FAST, "model": "vit_pico_patch4_28"}, out=str(tmp_path / "src")))
    probe = train(TrainConfig(**{**FAST, "model": None}, pretrained=str(src), linear_probe=True, out=str(tmp_path / "probe")))
    a, b = load_file(src / vrun.WEIGHTS), load_file(probe / vrun.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("head."))
    assert not torch.equal(a["head.weight"], b["head.weight"])
    with pytest.raises(ValueError, match="finetune='linear' is invalid: must be full without --pretrained"):
        TrainConfig(linear_probe=True)  # the old spelling of --finetune linear


def test_train_subset_is_stratified_and_seeded():
    from vitkit.data import subset_split

    d = load_data("mnist5k")
    part = subset_split(d.train, 1000, seed=0)
    assert len(part) == 1000 and torch.bincount(part.labels).tolist() == [100] * 10
    assert torch.equal(subset_split(d.train, 0.25, seed=0).labels, part.labels)  # 0.25 of 4,000 = 1,000
    assert not torch.equal(subset_split(d.train, 1000, seed=1).images, part.images)
    assert len(subset_split(d.train, 1.0, seed=0)) == 4000  # 1 is the whole split, not one image
    with pytest.raises(ValueError, match="asks for 5000 of 4000"):
        subset_split(d.train, 5000, seed=0)
