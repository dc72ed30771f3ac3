"""vitkit.explain: rollout algebra against hand-computed answers, every method on every family,
Swin's windows placed where the model attended, localisation after real training, and the CLI."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit import explain
from vitkit.cli import main
from vitkit.data import load_data
import vitkit.run as vrun
from vitkit.explain import geometry
from vitkit.models.contract import Intermediates

# -- rollout on hand-made attention ---------------------------------------------------------------


def test_rollout_two_blocks_by_hand():
    # Block 1, two heads that disagree; the mean is uniform:  Ã1 = 0.5*[[.5,.5],[.5,.5]] + 0.5*I.
    a1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]  # (1, 2 heads, 2, 2)
    # Block 2, one head, both tokens read token 1:  Ã2 = 0.5*[[0,1],[0,1]] + 0.5*I = [[.5,.5],[0,1]].
    a2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])[None]
    # R = Ã2 @ Ã1 = [[.5,.5],[0,1]] @ [[.75,.25],[.25,.75]] = [[.5,.5],[.25,.75]]
    R = explain.rollout_matrices([a1, a2])
    assert torch.allclose(R, torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]))
    # Order matters: block 2 first gives Ã1 @ Ã2 = [[.375,.625],[.125,.875]].
    assert torch.allclose(explain.rollout_matrices([a2, a1]), torch.tensor([[[0.375, 0.625], [0.125, 0.875]]]))


def test_rollout_head_fusion_and_discard_by_hand():
    a1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[None]
    # max over heads: all ones; + I -> [[2,1],[1,2]] / 3.
    assert torch.allclose(explain.rollout_matrices([a1], head_fusion="max"), torch.tensor([[[2, 1], [1, 2]]]) / 3.0)
    # min over heads: all zeros; + I -> identity.
    assert torch.allclose(explain.rollout_matrices([a1], head_fusion="min"), torch.eye(2)[None])
    # Discard half of [[.1,.9],[.6,.4]]: the two lowest (.1, .4) go -> [[0,.9],[.6,0]] + I, rows renormalised.
    a = torch.tensor([[[0.1, 0.9], [0.6, 0.4]]])
    expect = torch.tensor([[[1.0 / 1.9, 0.9 / 1.9], [0.6 / 1.6, 1.0 / 1.6]]])
    assert torch.allclose(explain.rollout_matrices([a], discard_ratio=0.5), expect)


def test_hierarchical_rollout_by_hand():
    # Stage 1: a class token and one map token; the class token reads 40% from the map token.
    R1 = torch.tensor([[[0.6, 0.4], [0.0, 1.0]]])
    # The map token was made from the four tokens of stage 0 (patch merging): 0.4 / 4 each...
    D = torch.full((1, 4), 0.25)
    # ...and stage 0 moves everything from token 3 to token 0.
    R0 = torch.eye(4)[None].clone()
    R0[0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    v = explain.hierarchical_rollout(torch.tensor([[1.0, 0.0]]), [(R0, 0), (R1, 1)], [D])
    assert torch.allclose(v, torch.tensor([[0.2, 0.1, 0.1, 0.0]]))


def test_receptive_fields_by_hand():
    # Kernel 3, stride 2, padding 1 on 4 inputs: output 0 sees inputs 0-1, output 1 sees 1-3.
    assert geometry.receptive_field_1d(2, 4, 3, 2, 1).tolist() == [[1, 1, 0, 0], [0, 1, 1, 1]]
    m = geometry.receptive_field_matrix((2, 2), (4, 4), 3, 2, 1)
    assert m.shape == (4, 16) and torch.allclose(m.sum(1), torch.ones(4))
    assert torch.allclose(m[0].view(4, 4), torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0.0]]) / 4)


# -- Swin: windows go back where the model took them -----------------------------------------------


@pytest.mark.parametrize("size,shift", [((8, 8), 2), ((6, 10), 2), ((8, 8), 0)])
def test_swin_windows_placed_on_the_map(size, shift):
    """The globalised matrix, applied to the values on the unrolled map, reproduces the block's
    own (shifted, padded) window attention: every probability lands on the pair it connected."""
    from vitkit.models.swin import SwinTransformerBlock

    blk = SwinTransformerBlock(8, 2, window_size=4, shift_size=shift).eval()
    x = blk.norm1(torch.randn(2, *size, 8))
    with torch.no_grad():
        y, attn = blk._window_attention(x, need_weights=True)  # (B, H, W, C), (B * windows, heads, n, n)
        window, sh = blk.window_and_shift(*size)
        G = geometry.swin_to_global(attn, size, window, sh)  # (B, heads, H*W, H*W)
        v = blk.attn.qkv(x.flatten(1, 2))[..., 16:].unflatten(-1, (2, 4)).transpose(1, 2)  # (B, heads, N, Dh)
        mixed = blk.attn.proj((G @ v).transpose(1, 2).flatten(2)).view_as(y)
    assert torch.allclose(mixed, y, atol=1e-5)
    assert torch.allclose(G.sum(-1), torch.ones(2, 2, size[0] * size[1]))


def test_cvt_squeezed_keys_become_square():
    attn = torch.softmax(torch.randn(2, 3, 1 + 16, 1 + 4), dim=-1)  # class token + 4x4 queries, 2x2 keys
    sq = geometry.cvt_to_square(attn, (4, 4), 1, 3, 2, 1)
    assert sq.shape == (2, 3, 17, 17) and torch.allclose(sq.sum(-1), torch.ones(2, 3, 17))
    assert torch.allclose(sq[..., 0], attn[..., 0])  # the class token keeps its own column
    with pytest.raises(ValueError, match="does not match"):
        geometry.cvt_to_square(attn, (5, 5), 1, 3, 2, 1)


# -- every method on every family -----------------------------------------------------------------

FAMILIES = {
    "vit_pico_conv4_28": {},
    "vit_pico_patch4_28": {},
    "deit_pico_distilled_conv4_28": {},
    "beit_pico_patch4_28": {},
    "cvt_pico_28": {},
    "swin_pico_patch2_window4_32": {},
    "vit_small_r26_s32_224": dict(img_size=64, embed_dim=48, depth=2, num_heads=2, num_classes=5),  # hybrid
    # registers (left out of the maps), attention pooling, pre-norm
    "vit_small_patch14_reg4_dinov2": dict(img_size=56, embed_dim=48, depth=2, num_heads=2, num_classes=5),
    "vit_base_patch16_siglip_224": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5),
    "vit_base_patch16_clip_224": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5),
    # rotary position embeddings (queries and keys rotated on the explicit path too)
    "eva02_tiny_patch14_224": dict(img_size=56, embed_dim=48, depth=2, num_heads=2, num_classes=5),
    "vit_small_patch16_dinov3": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=5),
}


def _model_and_input(name, size=None, batch=2):
    model = vitkit.create_model(name, **FAMILIES[name]).eval()
    side = size or (model.cfg.img_size if isinstance(model.cfg.img_size, int) else model.cfg.img_size[0])
    return model, torch.randn(batch, model.cfg.in_chans, side, side)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("method", explain.METHODS)
def test_every_method_gives_an_image_sized_map(name, method):
    model, x = _model_and_input(name)
    maps = explain.explain(model, x, method)
    assert maps.shape == (x.shape[0], *x.shape[-2:])
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1)).all()  # a picture, not a constant


@pytest.mark.parametrize("name,size", [("swin_pico_patch2_window4_32", 40), ("swin_pico_patch2_window4_32", 64),
                                       ("vit_pico_patch4_28", 36), ("cvt_pico_28", 33)])
def test_other_input_sizes(name, size):
    """Swin at 40 px pads its windows, at 64 px its last stage is windowed; ViT resamples positions."""
    model, x = _model_and_input(name, size, batch=1)
    for method in explain.METHODS:
        assert explain.explain(model, x, method).shape == (1, size, size)


@pytest.mark.parametrize("name", ["deit_pico_distilled_conv4_28", "swin_pico_patch2_window4_32", "cvt_pico_28"])
def test_attention_per_head(name):
    model, x = _model_and_input(name)
    heads = explain.attention_map(model, x, per_head=True)
    n_heads = {"deit_pico_distilled_conv4_28": 4, "swin_pico_patch2_window4_32": 12, "cvt_pico_28": 4}[name]
    assert heads.shape == (2, n_heads, *x.shape[-2:])


def test_head_query_follows_the_head():
    """Rollout's query row is the token(s) the classifier reads."""
    for name, expect in [("deit_pico_distilled_conv4_28", "prefix2"), ("beit_pico_patch4_28", "map"),
                         ("cvt_pico_28", "prefix1"), ("vit_pico_patch4_28", "map")]:
        model, x = _model_and_input(name)
        cap = explain.capture(model, x)
        q = explain.head_query(model, cap.features, cap.stages[-1])[0]
        P = cap.stages[-1].prefix
        if expect.startswith("prefix"):
            k = int(expect[-1])
            assert torch.allclose(q[:k], torch.full((k,), 1 / k)) and q[k:].abs().sum() == 0, name
        else:
            assert q[:P].abs().sum() == 0 and torch.allclose(q[P:], torch.full_like(q[P:], 1 / len(q[P:]))), name


@pytest.mark.parametrize("name", ["vit_pico_patch4_28", "swin_pico_patch2_window4_32", "cvt_pico_28"])
def test_discard_ratio_changes_the_map(name):
    model, x = _model_and_input(name, batch=1)
    plain, filtered = explain.rollout(model, x), explain.rollout(model, x, discard_ratio=0.9, head_fusion="max")
    assert filtered.shape == plain.shape and not torch.allclose(filtered, plain, atol=1e-3)


def test_mode_and_gradients_left_alone():
    model, x = _model_and_input("vit_pico_patch4_28")
    model.train()
    for method in explain.METHODS:
        explain.explain(model, x, method)
    assert model.training and all(p.grad is None for p in model.parameters())


# -- clear errors, never an empty picture ----------------------------------------------------------


class _NoAttention(torch.nn.Module):
    """A model whose contract returns no probabilities, as a fused-only implementation would."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.num_blocks = inner.num_blocks

    def forward_intermediates(self, x, indices=None, **kw):
        out = self.inner.forward_intermediates(x, indices, **kw)
        return Intermediates(out.features, out.intermediates, [])

    def forward_head(self, x):
        return self.inner.forward_head(x)


def test_errors():
    model, x = _model_and_input("vit_pico_patch4_28")
    with pytest.raises(ValueError, match="returned no attention probabilities"):
        explain.rollout(_NoAttention(model), x)
    with pytest.raises(ValueError, match="returned no attention probabilities"):
        explain.attention_map(_NoAttention(model), x)
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        explain.rollout(model, x, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        explain.rollout(model, x, discard_ratio=1.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        explain.rollout(model, x[0])
    with pytest.raises(ValueError, match="out of range"):
        explain.gradcam(model, x, target=10)
    with pytest.raises(ValueError, match="method must be one of"):
        explain.explain(model, x, "saliency")
    with pytest.raises(ValueError, match="not global attention"):
        geometry.check_global(torch.rand(2, 4, 5, 5), 2, (7, 7), 0, "M")


# -- localisation after real training ---------------------------------------------------------------
# The class is the digit (0-3) pasted at a random place on a 64x64 canvas. A square frame, pasted
# elsewhere, carries no class: an untrained model's attention is drawn to it (bright, regular
# strokes), so a map that finds the digit shows what training taught, not what the pixels shout.
CANVAS, DIGITS = 64, 4


def _canvases(digits: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits `(n, 28, 28)` in [0, 1] -> canvases `(n, 1, 64, 64)` and the digits' ink boxes `(n, 4)`."""
    n = len(digits)
    out, boxes = torch.zeros(n, 1, CANVAS, CANVAS), torch.zeros(n, 4, dtype=torch.long)
    frame = torch.zeros(28, 28)
    frame[4:24, 4:24], frame[7:21, 7:21] = 1.0, 0.0
    for i in range(n):
        while True:  # digit and frame at random, not overlapping
            y, x, fy, fx = torch.randint(0, CANVAS - 27, (4,), generator=g).tolist()
            if abs(fy - y) >= 28 or abs(fx - x) >= 28:
                break
        out[i, 0, fy : fy + 28, fx : fx + 28] = frame
        out[i, 0, y : y + 28, x : x + 28] = digits[i]
        ink = digits[i].nonzero()
        boxes[i] = torch.stack([y + ink[:, 0].min(), y + ink[:, 0].max(), x + ink[:, 1].min(), x + ink[:, 1].max()])
    return (out - 0.1) / 0.3, boxes


def _peak_on_digit(maps: torch.Tensor, boxes: torch.Tensor, margin: int = 2) -> float:
    flat = maps.flatten(1).argmax(1)
    py, px = flat // CANVAS, flat % CANVAS
    rows = (py >= boxes[:, 0] - margin) & (py <= boxes[:, 1] + margin)
    inside = rows & (px >= boxes[:, 2] - margin) & (px <= boxes[:, 3] + margin)
    return inside.float().mean().item()


@pytest.mark.slow  # trains a model first (~50 s on 2 cores); the maps' geometry is checked by hand above
def test_rollout_finds_the_digit_after_training():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = load_data("mnist5k")

    def subset(split, n):
        keep = (split.labels < DIGITS).nonzero().squeeze(1)[:n]
        return split.images[keep, 0].float() / 255, split.labels[keep]

    train_digits, train_labels = subset(data.train, 1600)
    val_digits, val_labels = subset(data.val, 200)
    x_val, boxes = _canvases(val_digits, g)
    # A class-token ViT with a convolutional stem and 8-px tokens (8x8 grid): small enough for ~30 s.
    model = vitkit.create_model("vit_pico_conv4_28", img_size=CANVAS, num_classes=DIGITS, patch_size=8, embed_dim=64,
                                depth=3, class_token=True, global_pool="token")
    untrained = _peak_on_digit(explain.rollout(model, x_val), boxes)

    epochs, batch, lr = 7, 16, 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(train_digits) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    for _ in range(epochs):
        x_train, _ = _canvases(train_digits, g)  # new places every epoch
        model.train()
        perm = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_val).argmax(1) == val_labels).float().mean().item()

    hit = _peak_on_digit(explain.rollout(model, x_val), boxes)
    chance = ((boxes[:, 1] - boxes[:, 0] + 5) * (boxes[:, 3] - boxes[:, 2] + 5)).float().mean().item() / CANVAS**2
    report = f"rollout peak on the digit {hit:.0%} (untrained {untrained:.0%}, chance {chance:.0%}, top-1 {acc:.0%})"
    print(report)
    assert hit >= 0.55 and hit >= 4 * chance, report
    assert hit >= untrained + 0.3, report


# -- the CLI ----------------------------------------------------------------------------------------


def _make_run(root: Path, name: str) -> Path:
    """A run directory around an untrained model: what `vitkit explain` needs, without training."""
    model = vitkit.create_model(name, num_classes=10, **{k: v for k, v in FAMILIES[name].items() if k != "num_classes"})
    cfg = model.cfg
    side = cfg.img_size if isinstance(cfg.img_size, int) else cfg.img_size[0]
    out = root / name
    vrun.save_weights(out / vrun.WEIGHTS, model.state_dict())
    c = cfg.in_chans
    vrun.RunRecord(model=name, model_args={**FAMILIES[name], "num_classes": 10, "in_chans": c, "img_size": [side, side]},
                   img_size=(side, side), in_chans=c, mean=(0.2,) * c, std=(0.3,) * c,
                   classes=[str(i) for i in range(10)], data="digits").write(out)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    d = load_data("digits")
    for i in range(2):
        Image.fromarray(d.val.images[i, 0].numpy(), "L").resize((28, 28)).save(folder / f"digit{i}.png")
    return folder


@pytest.mark.parametrize("name", ["vit_pico_conv4_28", "deit_pico_distilled_conv4_28", "beit_pico_patch4_28",
                                  "cvt_pico_28", "swin_pico_patch2_window4_32"])
def test_cli_explain_every_family(name, images, tmp_path, capsys):
    run = _make_run(tmp_path, name)
    out = tmp_path / "maps"
    assert main(["explain", str(run), str(images), "--method", "all", "--out", str(out)]) == 0
    assert "6 overlays" in capsys.readouterr().out
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"digit{i}_{m}.png" for i in range(2) for m in explain.METHODS)
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.format == "PNG" and im.width > 200


def test_cli_explain_options_and_default_folder(images, tmp_path):
    run = _make_run(tmp_path, "vit_pico_patch4_28")
    args = ["--head-fusion", "max", "--discard-ratio", "0.9"]
    assert main(["explain", str(run), str(images / "digit0.png"), *args]) == 0
    assert (run / "explain" / "digit0_rollout.png").exists()
    assert main(["explain", str(run), str(images / "digit1.png"), "--method", "gradcam", "--target", "3"]) == 0
    assert (run / "explain" / "digit1_gradcam.png").exists()


def test_cli_explain_errors(images, tmp_path, capsys, monkeypatch):
    run = _make_run(tmp_path, "vit_pico_patch4_28")
    assert main(["explain", str(run), str(tmp_path / "nope.png")]) == 2
    assert "no such image or folder" in capsys.readouterr().err
    assert main(["explain", str(run), str(images), "--method", "saliency"]) == 2
    assert "saliency" in capsys.readouterr().err
    assert main(["explain", str(run), str(images), "--discard-ratio", "1.5"]) == 2
    assert "discard_ratio" in capsys.readouterr().err
    assert main(["explain", str(run), str(images), "--method", "gradcam", "--target", "cat"]) == 2
    assert "not one of the run's classes" in capsys.readouterr().err

    # A model whose contract returns no attention (as a fused-only one would): an error, no picture.
    from vitkit.models.vit import VisionTransformer

    original = VisionTransformer.forward_intermediates

    def fused_only(self, x, indices=None, **kw):
        out = original(self, x, indices, **kw)
        return Intermediates(out.features, out.intermediates, [])

    monkeypatch.setattr(VisionTransformer, "forward_intermediates", fused_only)
    out = tmp_path / "none"
    assert main(["explain", str(run), str(images), "--method", "attention", "--out", str(out)]) == 2
    assert "returned no attention probabilities" in capsys.readouterr().err
    assert not out.exists()
