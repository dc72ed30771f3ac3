"""Self-supervised pre-training: masks, losses, MAE's visible-only encoder, tokenizers, and real runs
through the CLI that fine-tune, resume and write their pictures."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vitkit.cli import main
from vitkit.models import create_model, get_model_entry, list_models
from vitkit.engine import PretrainConfig, pretrain
from vitkit.engine.objectives.beit import BeitMIM
from vitkit.engine.objectives.mae import MaskedAutoencoder, patchify, unpatchify
from vitkit.engine.objectives.masking import BlockwiseMaskGenerator, RandomMaskGenerator
from vitkit.engine.objectives.tokenizer import build_kmeans_tokenizer, kmeans, load_tokenizer
from vitkit.run import RunRecord

FAST = ["--data", "digits", "--img-size", "16", "--batch-size", "128", "--epochs", "3", "--vocab-size", "64"]


# -- masks ----------------------------------------------------------------------------------------
def test_random_masks_have_the_ratio_in_every_image():
    masks = RandomMaskGenerator((7, 7), 0.75)(64)
    assert masks.shape == (64, 49) and masks.dtype == torch.bool
    assert (masks.sum(1) == 37).all()  # round(49 * 0.75)
    assert len({tuple(m.tolist()) for m in masks}) == 64  # random per image
    assert (RandomMaskGenerator((14, 14), 0.75)(4).sum(1) == 147).all()


@pytest.mark.parametrize("grid", [(7, 7), (14, 14), (8, 12)])
def test_blockwise_masks_reach_about_40_percent_in_blocks(grid):
    masks = BlockwiseMaskGenerator(grid, 0.4)(400)
    N = grid[0] * grid[1]
    assert masks.shape == (400, N) and masks.dtype == torch.bool
    ratio = masks.float().mean().item()
    assert 0.36 <= ratio <= 0.42, ratio
    assert (masks.sum(1) <= round(0.4 * N)).all()  # the target is never overshot
    # Blocks, not scattered patches: few masked/visible borders compared with random masking.
    m = masks.view(-1, *grid).float()

    def borders(x):
        return ((x[:, 1:] != x[:, :-1]).float().mean() + (x[:, :, 1:] != x[:, :, :-1]).float().mean()).item() / 2

    scattered = (torch.rand_like(m) < ratio).float()
    assert borders(m) < 0.6 * borders(scattered)


def test_blockwise_blocks_are_rectangles_with_sampled_aspect_ratios():
    gen = BlockwiseMaskGenerator((14, 14), 0.1, min_block=16, max_block=16)  # mostly one 16-patch block
    shapes, rectangles = set(), 0
    for m in gen(200).view(-1, 14, 14):
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        if m.sum() == h * w:  # the mask fills its bounding box
            rectangles += 1
            shapes.add((int(h), int(w)))
    assert rectangles >= 180
    assert any(h != w for h, w in shapes) and len(shapes) >= 3  # tall, wide and square blocks


def test_masks_follow_torch_seed():
    for gen in (RandomMaskGenerator((7, 7)), BlockwiseMaskGenerator((7, 7))):
        torch.manual_seed(3)
        a = gen(8)
        torch.manual_seed(3)
        assert torch.equal(a, gen(8))


# -- losses count only masked patches -------------------------------------------------------------
def test_mae_loss_counts_only_masked_patches():
    pred, target = torch.randn(4, 49, 16), torch.randn(4, 49, 16)
    mask = RandomMaskGenerator((7, 7), 0.75)(4)
    loss = MaskedAutoencoder.forward_loss(pred, target, mask)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean(-1)[mask].mean().item(), rel=1e-6)
    changed = pred.clone()
    changed[~mask] += 100.0  # visible patches: no effect
    assert MaskedAutoencoder.forward_loss(changed, target, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed = pred.clone()
    changed[mask] += 1.0
    assert MaskedAutoencoder.forward_loss(changed, target, mask).item() > loss.item() + 0.5


def test_beit_loss_counts_only_masked_patches():
    logits, tokens = torch.randn(4, 49, 32), torch.randint(0, 32, (4, 49))
    mask = BlockwiseMaskGenerator((7, 7), 0.4)(4)
    loss = BeitMIM.forward_loss(logits, tokens, mask)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[mask], tokens[mask]).item(), rel=1e-6)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 50
    assert BeitMIM.forward_loss(changed, tokens, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed = logits.clone()
    changed[mask] = torch.randn_like(changed[mask]) * 50
    assert BeitMIM.forward_loss(changed, tokens, mask).item() != pytest.approx(loss.item(), rel=1e-3)


def test_mae_norm_pix_targets_and_patchify_round_trip():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, (4, 4))
    assert p.shape == (2, 6, 48)
    assert torch.equal(unpatchify(p, (4, 4), (2, 3), 3), x)
    assert torch.equal(p[0, 1], x[0, :, :4, 4:8].permute(1, 2, 0).reshape(-1))  # row-major patches, channels last
    mae = MaskedAutoencoder(create_model("vit_pico_patch4_28", num_classes=0, in_chans=3, img_size=(8, 12)))
    t = mae.targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 6), atol=1e-5)
    assert torch.allclose(t.std(-1), torch.ones(2, 6), atol=1e-3)


# -- MAE's encoder ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,prefix", [({}, 0), ({"class_token": True, "global_pool": "token"}, 1)])
def test_mae_encoder_sees_only_visible_tokens(overrides, prefix):
    enc = create_model("vit_pico_patch4_28", num_classes=0, **overrides)
    mae = MaskedAutoencoder(enc, mask_ratio=0.75)
    seen = []
    for blk in enc.blocks:
        blk.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x = torch.randn(3, 1, 28, 28)
    mask = mae.masking(3, (7, 7), "cpu")
    out = mae.predict(x, mask)
    assert seen == [prefix + 12] * 4  # 49 patches, 37 masked: 12 visible in every block
    assert out.pred.shape == (3, 49, 16)
    # The encoder really uses the visible patches: changing a masked patch's pixels changes nothing.
    y = x.clone()
    first_masked = int(mask[0].nonzero()[0])
    r, c = divmod(first_masked, 7)
    y[0, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 5.0
    assert torch.allclose(mae.forward_encoder(x, mask), mae.forward_encoder(y, mask))


def test_mae_works_with_every_vit_family_model_at_its_size():
    names = [n for n in list_models() if get_model_entry(n).family in ("vit", "deit", "hybrid")]
    assert len(names) >= 10
    for name in names:
        cfg = get_model_entry(name).config
        side = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            enc = create_model(name, num_classes=0)
            mae = MaskedAutoencoder(enc)
            seen = []
            enc.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
            out = mae.predict(torch.empty(2, cfg.in_chans, side, side))
        N = out.mask.shape[1]
        assert seen == [enc.num_prefix_tokens + N - round(0.75 * N)], name
        assert out.pred.shape == out.target.shape == (2, N, enc.patch_embed.reduction[0] ** 2 * cfg.in_chans), name


def test_mae_encoder_keeps_each_visible_patchs_rotary_angles():
    """EVA-02 has RoPE in every block: a kept patch must keep its own angles whatever its slot in the
    visible sequence. Every patch kept, in a shuffled order per image: the same tokens, shuffled."""
    enc = create_model("eva02_tiny_patch14_224", num_classes=0, img_size=56, embed_dim=48, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 56, 56)
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        full = enc.forward_features(x)[:, 1:]
        shuffled = enc.forward_visible(x, order)[:, 1:]
    assert torch.allclose(shuffled, full.gather(1, order.unsqueeze(-1).expand(-1, -1, 48)), atol=1e-5)
    out = MaskedAutoencoder(enc).predict(x)  # and MAE takes it as a backbone
    assert out.pred.shape == out.target.shape == (2, 16, 14 * 14 * 3)


def test_objectives_refuse_the_wrong_backbone():
    with pytest.raises(ValueError, match="ViT-family"):
        MaskedAutoencoder(create_model("beit_pico_patch4_28", num_classes=0))
    tok = build_kmeans_tokenizer(torch.rand(4, 1, 28, 28), (4, 4), (0.5,), (0.5,), vocab_size=8)
    with pytest.raises(ValueError, match="use_mask_token"):
        BeitMIM(create_model("beit_pico_patch4_28", num_classes=0), tok, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"needs a model with a \[MASK\] embedding"):
        pretrain(PretrainConfig(method="beit", model="vit_pico_patch4_28", data="digits"))


# -- tokenizers -------------------------------------------------------------------------------------
def test_kmeans_finds_separated_clusters():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(200, 2) for c in centers])
    found = kmeans(x, 3, seed=0)
    assert torch.cdist(found, centers).min(0).values.max() < 0.1


def test_kmeans_tokenizer_tokens_decode_and_round_trip(tmp_path):
    pixels = torch.rand(32, 1, 28, 28)
    tok = build_kmeans_tokenizer(pixels, (4, 4), (0.3,), (0.4,), vocab_size=16, seed=0)
    ids = tok(pixels[:4])
    assert ids.shape == (4, 49) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 16
    dec = tok.decode(ids, (7, 7))
    assert dec.shape == (4, 1, 28, 28)
    # Decoding is the nearest centroid: closer to the image than any other token would be.
    assert (dec - pixels[:4]).pow(2).mean() < (tok.decode((ids + 1) % 16, (7, 7)) - pixels[:4]).pow(2).mean()
    tok.save(tmp_path / "tok.safetensors")
    again = load_tokenizer(tmp_path / "tok.safetensors")
    assert torch.equal(again(pixels), tok(pixels)) and again.vocab_size == 16


def test_kmeans_tokens_of_every_patch_decode_to_the_image():
    image = torch.rand(1, 3, 16, 12)  # 12 distinct patches: a codebook of 12 holds each of them exactly
    tok = build_kmeans_tokenizer(image, (4, 4), (0.5,) * 3, (0.25,) * 3, vocab_size=12)
    ids = tok(image)
    assert sorted(ids[0].tolist()) == list(range(12))
    assert torch.allclose(tok.decode(ids, (4, 3)), image, atol=1e-5)


class _Brightness(torch.nn.Module):
    """A stand-in external tokenizer: each 4x4 patch's mean brightness in 8 levels."""

    def __init__(self) -> None:
        super().__init__()
        self.vocab_size = 8  # an attribute TorchScript keeps; load_tokenizer reads it

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        level = torch.nn.functional.avg_pool2d(pixels.mean(1, keepdim=True), 4).squeeze(1)  # (B, h, w)
        return (level * 8).long().clamp(0, 7)


@pytest.mark.parametrize("kind", ["torch.export", "torchscript"])
def test_external_tokenizer_drives_beit(tmp_path, kind):
    if kind == "torch.export":
        path = tmp_path / "brightness.pt2"
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(_Brightness(), (torch.rand(2, 1, 28, 28),),
                                              dynamic_shapes={"pixels": {0: batch}}), str(path))
        tok = load_tokenizer(path, vocab_size=8)  # an exported program keeps no attributes
    else:
        path = tmp_path / "brightness.pt"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, but users have such files
            torch.jit.save(torch.jit.script(_Brightness()), str(path))
            tok = load_tokenizer(path)
    assert tok.vocab_size == 8
    mim = BeitMIM(create_model("beit_pico_patch4_28", num_classes=0, use_mask_token=True), tok, mean=(0.5,), std=(0.5,))
    x = torch.randn(2, 1, 28, 28)
    out = mim.predict(x)
    assert out.pred.shape == (2, 49, 8) and torch.equal(out.target, _Brightness()((x * 0.5 + 0.5).clamp(0, 1)).flatten(1))
    out.loss.backward()


def test_unknown_tokenizer_files_are_refused(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "state.pt")  # a state dict, not a program
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(tmp_path / "state.pt")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.pt")


# -- real runs through the CLI ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short pre-training run per method on digits, through `vitkit pretrain`."""
    root = tmp_path_factory.mktemp("pretrain")
    out = {}
    for method in ("mae", "beit"):
        assert main(["pretrain", "--method", method, *FAST, "--out", str(root / method)]) == 0
        out[method] = root / method
    return out


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_pretraining_on_real_data_lowers_its_loss_and_writes_the_run(runs, method):
    run = runs[method]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    assert rows[-1]["train_loss"] < 0.97 * rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    picture = run / ("mae_reconstructions.png" if method == "mae" else "beit_masks.png")
    with Image.open(picture) as im:
        assert im.format == "PNG" and im.size[0] > 8 * 16
    assert len(list((run / "pictures").glob("*.png"))) == 3
    for name in ("config.yaml", "model.safetensors", "checkpoint.pt", "curves.png"):
        assert (run / name).exists(), name
    if method == "beit":
        assert (run / "tokenizer.safetensors").exists()


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_pretrained_run_loads_for_finetuning_with_only_the_head_missing(runs, method):
    run = runs[method]
    rec = RunRecord.read(run)
    name = rec.model
    assert "use_mask_token" not in rec.model_args
    assert rec.objective == method and rec.classes == [] and rec.in_chans == 1 and rec.img_size == (16, 16)
    saved = load_file(run / "model.safetensors")
    assert not any(k.startswith(("decoder", "mask_token", "lm_head", "encoder.")) for k in saved)
    classifier = create_model(name, num_classes=10, in_chans=1, img_size=16)
    missing = set(classifier.state_dict()) - set(saved)
    unexpected = set(saved) - set(classifier.state_dict())
    assert missing == {"head.weight", "head.bias"} and not unexpected
    loaded = create_model(name, pretrained=run, num_classes=10, in_chans=1, img_size=16)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_cli_finetunes_a_pretrained_run(runs, method, tmp_path):
    out = tmp_path / "ft"
    assert main(["train", "--pretrained", str(runs[method]), "--data", "digits", "--img-size", "16", "--epochs", "1",
                 "--warmup-epochs", "0", "--train-subset", "0.1", "--out", str(out)]) == 0
    rec, pre = RunRecord.read(out), RunRecord.read(runs[method])
    assert rec.model == pre.model and rec.objective == "classify"
    assert rec.mean == pre.mean  # the pre-training normalisation
    assert rec.settings["layer_decay"] == 0.75


@pytest.mark.parametrize("method", ["mae", "beit"])
def test_cli_pretrains_on_a_flat_folder_of_images(tmp_path, method):
    rng = np.random.default_rng(0)
    flat, labelled = tmp_path / "images", tmp_path / "labelled"
    flat.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    (flat / "notes.txt").write_text("not an image")
    for c in ("cat", "dog"):
        (labelled / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(labelled / c / f"{i}.png")
    out = tmp_path / "run"
    assert main(["pretrain", "--method", method, "--data", str(flat), "--img-size", "16", "--epochs", "2",
                 "--batch-size", "4", "--vocab-size", "16", "--num-workers", "0", "--out", str(out)]) == 0
    assert (out / ("mae_reconstructions.png" if method == "mae" else "beit_masks.png")).exists()
    assert main(["train", "--pretrained", str(out), "--data", str(labelled), "--img-size", "16", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "4", "--num-workers", "0", "--out", str(tmp_path / "ft")]) == 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = pretrain(PretrainConfig(method="beit", data="digits", img_size=16, epochs=2, out=str(tmp_path / "run")))
    weights = load_file(full / "model.safetensors")
    # Roll the run back to its first epoch, as a run killed during the second would be.
    (full / "checkpoint.pt").replace(full / "checkpoint-keep.pt")
    (full / "checkpoint-prev.pt").replace(full / "checkpoint.pt")
    assert main(["pretrain", "--resume", str(full)]) == 0
    again = load_file(full / "model.safetensors")
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    assert len((full / "metrics.jsonl").read_text().splitlines()) == 2


def test_torchrun_pretrains_with_two_processes(tmp_path):
    """gloo on CPU: both processes train, one writes the run, it says so once, and the run fine-tunes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vitkit", "pretrain", "--method", "mae", "--data", "digits", "--img-size", "16",
                          "--epochs", "2", "--batch-size", "32", "--device", "cpu", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("run saved to") == 1
    assert RunRecord.read(out).world_size == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["train_loss"] < rows[0]["train_loss"]
    assert main(["train", "--pretrained", str(out), "--data", "digits", "--img-size", "16", "--epochs", "1",
                 "--warmup-epochs", "0", "--out", str(tmp_path / "ft")]) == 0


def test_bad_options_fail_with_one_line(tmp_path, capsys):
    assert main(["pretrain", "--method", "simclr", "--out", str(tmp_path / "x")]) == 2
    assert main(["pretrain", "--method", "mae", "--mask-ratio", "1.5", "--out", str(tmp_path / "x")]) == 2
    assert main(["pretrain", "--method", "mae", "--model", "beit_pico_patch4_28", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "mask_ratio" in err and "ViT-family" in err


# -- the engine's features work for pre-training as for classification ------------------------------
def test_pretraining_with_accumulation_ema_checkpointing_and_skipped_steps(tmp_path, monkeypatch):
    real, calls = MaskedAutoencoder.forward_loss, {"n": 0}

    def nan_twice(pred, target, mask):  # steps 2 and 5 of the first epoch give a NaN loss
        calls["n"] += 1
        value = real(pred, target, mask)
        return value * float("nan") if calls["n"] in (3, 6) else value

    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", staticmethod(nan_twice))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping step"):
        assert main(["pretrain", "--data", "digits", "--img-size", "16", "--epochs", "2", "--batch-size", "32",
                     "--accum-steps", "2", "--ema", "0.99", "--grad-checkpointing", "--skip-nonfinite", "2",
                     "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["nonfinite_steps"] == 2 and rows[1]["nonfinite_steps"] == 0
    assert {"val_loss", "val_loss_ema"} <= set(rows[-1]) and rows[-1]["train_loss"] < rows[0]["train_loss"]
    raw, ema = load_file(out / "model.safetensors"), load_file(out / "model_ema.safetensors")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    rec = RunRecord.read(out)
    assert rec.ema and rec.settings["accum_steps"] == 2 and rec.settings["grad_checkpointing"]
    # A third NaN is one too many: the run stops, naming the step.
    calls["n"] = 0
    monkeypatch.setattr(MaskedAutoencoder, "forward_loss", staticmethod(lambda p, t, m: real(p, t, m) * float("nan")))
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        pretrain(PretrainConfig(data="digits", img_size=16, epochs=1, batch_size=32, out=str(tmp_path / "stop")))


def test_pretraining_compiles(tmp_path):
    out = tmp_path / "compiled"
    assert main(["pretrain", "--method", "beit", "--data", "digits", "--img-size", "16", "--epochs", "1",
                 "--batch-size", "64", "--vocab-size", "16", "--tokenizer-images", "256", "--compile",
                 "--grad-checkpointing", "--ema", "0.99", "--accum-steps", "2", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"]) and np.isfinite(rows[0]["val_loss_ema"])
    assert RunRecord.read(out).settings["compile"] is True


def test_beit_pre_training_continues_from_a_run_without_a_mask_token(runs, tmp_path):
    """A BEiT run's weights (and a classifier's) hold no [MASK] embedding: it starts fresh, the rest loads."""
    out = tmp_path / "more"
    assert main(["pretrain", "--method", "beit", "--pretrained", str(runs["beit"]), *FAST[:4], "--epochs", "1",
                 "--vocab-size", "16", "--tokenizer-images", "256", "--out", str(out)]) == 0
    before, after = load_file(runs["beit"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and "mask_token" not in after
    rec = RunRecord.read(out)
    assert rec.model == RunRecord.read(runs["beit"]).model
    fresh = create_model(rec.model, **rec.model_args).state_dict()
    key = "blocks.0.attn.qkv.weight"  # one epoch moved the loaded weights a little, not to a fresh start
    assert (after[key] - before[key]).norm() < 0.5 * (fresh[key] - before[key]).norm()
