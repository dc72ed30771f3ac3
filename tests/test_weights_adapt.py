"""Pretrained weights into another number of input channels, and files that carry pickled code.

Every registered family loads 3-channel weights into a 1-channel model and back; the adapted model
must give on a grey image what the source gave on that image copied to every channel. The CLI
path (`vitkit pretrain` on grey digits, `vitkit train --pretrained` on RGB images) must run too.
A pickle payload is refused with vitkit's message, and never runs.
"""

import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import perturb
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main
from vitkit.models import get_model_entry, list_models
from vitkit.models.weights import adapt_input_conv, read_state_dict, torch_load_tensors

# One small variant per family: (name, overrides, image side).
FAMILIES = {
    "vit": ("vit_pico_patch4_28", {}, 28),
    "deit": ("deit_pico_distilled_conv4_28", {}, 28),  # a convolutional stem: conv, BatchNorm, ...
    "hybrid": ("vit_small_r26_s32_224", dict(backbone_layers=(1, 1), embed_dim=64, depth=1, num_heads=2,
                                             img_size=32, num_classes=5), 32),
    "swin": ("swin_pico_patch2_window4_32", {}, 32),
    "beit": ("beit_pico_patch4_28", {}, 28),
    "cvt": ("cvt_pico_28", {}, 28),
    "cnn": ("tv:resnet18", dict(num_classes=5, img_size=32), 32),
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=48, depth=1, num_heads=2), 28),
    "clip": ("vit_base_patch16_clip_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2), 32),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2), 32),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, embed_dim=48, depth=1, num_heads=2), 28),
    "dinov3": ("vit_small_patch16_dinov3", dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2), 32),
}


def test_every_family_is_covered():
    assert {get_model_entry(n).family for n in list_models()} == set(FAMILIES)


@pytest.mark.parametrize("src, dst", [(3, 1), (1, 3)])
@pytest.mark.parametrize("family", FAMILIES)
def test_first_conv_is_adapted_to_other_channels(family, src, dst, tmp_path):
    name, kw, side = FAMILIES[family]
    source = perturb(vitkit.create_model(name, in_chans=src, **kw))
    if family == "hybrid" and src == 3:
        # The ResNet stem standardises its weight per filter (mean 0, variance 1 over channels and
        # kernel), so a channel sum is exact only up to one scale per filter, which the GroupNorm
        # after it removes when the scale is the same for all filters: grey-consistent RGB filters.
        with torch.no_grad():
            w = source.patch_embed.backbone.stem.conv.weight
            w.copy_(w[:, :1].expand_as(w))
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    how = "summed over its 3 channels" if dst == 1 else "channels repeated and scaled by 1/3"
    with pytest.warns(UserWarning, match=f"{src}-channel images, the model takes {dst}: adapting the first "
                                          f"convolution {re.escape(source.first_conv)} \\({how}\\)"):
        adapted = vitkit.create_model(name, pretrained=tmp_path / "w.safetensors", in_chans=dst, **kw).eval()
    assert adapted.cfg.in_chans == dst
    grey = torch.randn(2, 1, side, side)
    with torch.no_grad():
        out = adapted(grey.expand(-1, dst, -1, -1))
        ref = source(grey.expand(-1, src, -1, -1))
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_adapt_input_conv_matches_timm():
    timm_helpers = pytest.importorskip("timm.models._manipulate")
    w = torch.randn(8, 3, 4, 4)
    for n in (1, 2, 4, 6):
        assert torch.equal(adapt_input_conv(w, n), timm_helpers.adapt_input_conv(n, w.clone()))
    grey = torch.randn(8, 1, 4, 4)
    for n in (2, 3, 5):  # from one channel: the copies sum to the original filter
        torch.testing.assert_close(adapt_input_conv(grey, n).sum(1, keepdim=True), grey)
    assert adapt_input_conv(w.half(), 1).dtype == torch.float16


def test_a_model_name_is_needed_unless_the_checkpoint_names_one(tmp_path):
    save_file(vitkit.create_model("vit_pico_patch4_28").state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="does not name its architecture .*pass a model name"):
        vitkit.create_model(pretrained=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="needs a model name"):
        vitkit.create_model()


# -- the command line: grey pre-training, RGB fine-tuning -------------------------------------------
def _rgb_digits(root, per_class: int = 12):
    """Two classes of 28x28 RGB PNGs: sklearn digits, upscaled and tinted per image."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in (0, 1):
        folder = root / f"digit{label}"
        folder.mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == label][:per_class]):
            grey = np.kron(img / 16.0, np.ones((4, 4)))[2:30, 2:30]  # 8x8 -> 32x32, cropped to 28x28
            tint = rng.uniform(0.3, 1.0, size=3)
            Image.fromarray((grey[..., None] * tint * 255).astype(np.uint8), "RGB").save(folder / f"{i}.png")
    return root


def test_cli_fine_tunes_grey_pretraining_on_rgb_images(tmp_path):
    grey_run, rgb = tmp_path / "mae", _rgb_digits(tmp_path / "rgb")
    assert main(["pretrain", "--method", "mae", "--data", "digits", "--img-size", "16", "--epochs", "1",
                 "--warmup-epochs", "0", "--batch-size", "128", "--num-workers", "0", "--out", str(grey_run)]) == 0
    out = tmp_path / "ft"
    with pytest.warns(UserWarning, match="1-channel images, the model takes 3: adapting the first convolution"):
        assert main(["train", "--pretrained", str(grey_run), "--data", str(rgb), "--img-size", "16", "--epochs", "1",
                     "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0", "--out", str(out)]) == 0
    assert vitkit.load_run(out).model.cfg.in_chans == 3


# -- files carrying pickled code ------------------------------------------------------------------
class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def _check_refusal(message: str, marker) -> None:
    assert re.search(r"global (posix|os|nt)\.system", message), message  # what was found
    assert "nothing in it was executed" in message and "vitkit convert" in message
    assert "weights_only" not in message  # never the advice to load it unsafely
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 4"])
def test_pickle_payload_is_refused_with_vitkits_message(writer, tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    if writer == "torch.save":
        torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload(marker)}, bad)
    else:  # protocol 4 is refused at its first opcode, before PyTorch sees the global
        bad.write_bytes(pickle.dumps({"w": Payload(marker)}, protocol=int(writer[-1])))
    with pytest.raises(ValueError) as e:
        torch_load_tensors(bad)
    _check_refusal(str(e.value), marker)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # PyTorch's own text is not chained
    for load in (lambda: read_state_dict(bad), lambda: vitkit.create_model("vit_pico_patch4_28", pretrained=bad)):
        with pytest.raises(ValueError, match=f"cannot read weights from {re.escape(str(bad))}") as e:
            load()
        _check_refusal(str(e.value), marker)


def test_cli_convert_refuses_a_pickle_payload(tmp_path, capsys):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pth"
    torch.save({"state_dict": Payload(marker)}, bad)
    assert main(["convert", str(bad), str(tmp_path / "out"), "--model", "vit_pico_patch4_28"]) == 2
    err = capsys.readouterr().err
    _check_refusal(err, marker)
    assert not (tmp_path / "out").exists()
