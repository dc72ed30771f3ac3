"""Weight converters: timm files, Hugging Face directories and JAX .npz give the source model's logits.

Reference models get random weights, perturbed so that zero-initialised biases, bias tables and
constant layer scales hide nothing; each is saved in its library's format, loaded into vitkit and
compared in eval mode. Run with `-s` to see the max differences.
"""

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import perturb
from safetensors.torch import load_file, save_file

import vitkit
from vitkit.cli import main
from vitkit.convert import convert, detect_format, load_pretrained, read_checkpoint
from vitkit.models.layers import sincos_2d_pos_embed

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models import beit as timm_beit  # noqa: E402
from timm.models import swin_transformer as timm_swin  # noqa: E402
from timm.models import vision_transformer as timm_vit  # noqa: E402

TOL = 1e-4
SMALL_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def max_diff(ours: torch.nn.Module, ref_logits: torch.Tensor, x: torch.Tensor, label: str) -> float:
    with torch.no_grad():
        d = (ours.eval()(x) - ref_logits).abs().max().item()
    print(f"\n{label}: max|diff| {d:.2e} (max|logit| {ref_logits.abs().max().item():.2f})")
    return d


# -- timm files ------------------------------------------------------------------------------------
TIMM_NAMES = ["vit_base_patch16_224", "deit_base_distilled_patch16_224", "swin_tiny_patch4_window7_224",
              "beit_base_patch16_224"]


def timm_state_with_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict plus every buffer, as timm < 0.9 and the original releases saved them."""
    state = dict(model.state_dict())
    state.update({k: b.clone() for k, b in model.named_buffers() if k.endswith(("relative_position_index", "attn_mask"))})
    return state


@pytest.mark.parametrize("name", TIMM_NAMES)
def test_timm_files(name, tmp_path):
    ref = perturb(timm.create_model(name, pretrained=False))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
    state = timm_state_with_buffers(ref)
    if name.startswith(("swin", "beit")):
        assert any("relative_position_index" in k for k in state)
    del ref
    files = {"safetensors": tmp_path / "m.safetensors", "pth": tmp_path / "m.pth", "bin": tmp_path / "m.bin"}
    save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    torch.save({"model": state}, files["pth"])  # the wrappers training scripts write
    torch.save({"state_dict": state}, files["bin"])
    for fmt, path in files.items():
        ours = vitkit.create_model(name, pretrained=path)
        assert max_diff(ours, logits, x, f"timm {name} .{fmt}") <= TOL


def small_timm_vit(**kw) -> torch.nn.Module:
    return perturb(timm_vit.VisionTransformer(**{**SMALL_VIT, **kw}))


def test_old_swin_layout(tmp_path):
    # timm < 0.9 and microsoft/Swin-Transformer merge patches at the end of a stage; head is `head`.
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)
    ref = perturb(timm_swin.SwinTransformer(**kw))
    old = {}
    for k, v in timm_state_with_buffers(ref).items():
        if ".downsample." in k:
            stage = int(k.split(".")[1])
            k = k.replace(f"layers.{stage}.", f"layers.{stage - 1}.", 1)
        old[k.replace("head.fc.", "head.")] = v
    torch.save(old, tmp_path / "swin_old.pth")
    ours = vitkit.create_model("swin_pico_patch2_window4_32", pretrained=tmp_path / "swin_old.pth", **kw)
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(ours, ref(x).detach(), x, "timm swin, old layout") <= TOL


# -- resolution and window changes ------------------------------------------------------------------
def test_vit_resolution_change_matches_timm(tmp_path):
    ref32 = small_timm_vit()
    save_file(ref32.state_dict(), tmp_path / "vit.safetensors")
    ref48 = timm_vit.VisionTransformer(**{**SMALL_VIT, "img_size": 48}).eval()
    ref48.load_state_dict(timm_vit.checkpoint_filter_fn(ref32.state_dict(), ref48))
    ours = vitkit.create_model("vit_base_patch16_224", pretrained=tmp_path / "vit.safetensors",
                               **{**SMALL_VIT, "img_size": 48})
    x = torch.randn(2, 3, 48, 48)
    assert max_diff(ours, ref48(x).detach(), x, "timm vit 32 -> 48 px") <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolator warns about its own indexing
def test_beit_resolution_change_matches_timm(tmp_path):
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5, init_values=0.1,
              use_abs_pos_emb=False, use_rel_pos_bias=True)
    ref32 = perturb(timm_beit.Beit(**kw))
    torch.save(timm_state_with_buffers(ref32), tmp_path / "beit.pth")
    ref48 = timm_beit.Beit(**{**kw, "img_size": 48}).eval()
    ref48.load_state_dict(timm_beit.checkpoint_filter_fn(ref32.state_dict(), ref48))
    ours = vitkit.create_model("beit_base_patch16_224", pretrained=tmp_path / "beit.pth", **{**kw, "img_size": 48})
    x = torch.randn(2, 3, 48, 48)
    assert max_diff(ours, ref48(x).detach(), x, "timm beit 32 -> 48 px") <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolator warns about its own indexing
def test_swin_window_change_matches_timm(tmp_path):
    kw = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)
    ref4 = perturb(timm_swin.SwinTransformer(**kw, window_size=4))
    save_file(ref4.state_dict(), tmp_path / "swin.safetensors")
    ref8 = timm_swin.SwinTransformer(**kw, window_size=8).eval()
    ref8.load_state_dict(timm_swin.checkpoint_filter_fn(ref4.state_dict(), ref8))
    ours = vitkit.create_model("swin_pico_patch2_window4_32", pretrained=tmp_path / "swin.safetensors", **kw,
                               window_size=8)
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(ours, ref8(x).detach(), x, "timm swin window 4 -> 8") <= TOL


def test_head_reset_keeps_backbone(tmp_path):
    ref = small_timm_vit()
    save_file(ref.state_dict(), tmp_path / "vit.safetensors")
    arch = {k: v for k, v in SMALL_VIT.items() if k != "num_classes"}
    with pytest.warns(UserWarning, match="re-initialising the classifier"):
        ours = vitkit.create_model("vit_base_patch16_224", pretrained=tmp_path / "vit.safetensors", num_classes=7,
                                   **arch).eval()
    assert ours.head.weight.shape == (7, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= TOL


# -- Hugging Face transformers -----------------------------------------------------------------------
def _hf(cls: str, cfg: str, **kw):
    return perturb(getattr(transformers, cls)(getattr(transformers, cfg)(**kw)))


SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
             patch_size=8, num_labels=5)
HF_CASES = {
    "vit": ("ViTForImageClassification", "ViTConfig", SMALL),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", SMALL),
    "deit_single_head": ("DeiTForImageClassification", "DeiTConfig", SMALL),
    # Swin at the size of swin_pico (patch 2, window 4): the 4x4 last stage is one window.
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=2, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=4,
                  num_labels=10)),
    "beit": ("BeitForImageClassification", "BeitConfig", dict(SMALL, use_relative_position_bias=True)),
    "beit_shared_abs_cls": ("BeitForImageClassification", "BeitConfig",
                            dict(SMALL, use_shared_relative_position_bias=True, use_absolute_position_embeddings=True,
                                 use_mean_pooling=False, layer_scale_init_value=0.0)),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each small transformers model saved twice: safetensors, and a pytorch_model.bin."""
    out = {}
    for key, (cls, cfg, kw) in HF_CASES.items():
        model = _hf(cls, cfg, **kw)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        st = tmp_path_factory.mktemp(f"{key}_st")
        model.save_pretrained(st)
        # transformers 5 writes safetensors whatever `safe_serialization` says: write the .bin directly.
        pt = tmp_path_factory.mktemp(f"{key}_bin")
        (pt / "config.json").write_text((st / "config.json").read_text())
        torch.save(load_file(st / "model.safetensors"), pt / "pytorch_model.bin")
        out[key] = (st, pt, x, logits)
    return out


@pytest.mark.parametrize("key", HF_CASES)
def test_hf_directories(key, hf_dirs):
    st, pt, x, logits = hf_dirs[key]
    for fmt, path in (("safetensors", st), ("pytorch_model.bin", pt)):
        # The single-head DeiT is folded into vitkit's two heads, which is said.
        with pytest.warns(UserWarning, match="folded") if key == "deit_single_head" else contextlib.nullcontext():
            ckpt = read_checkpoint(path)
            ours = vitkit.create_model(ckpt.name, pretrained=path, **ckpt.overrides)
        assert max_diff(ours, logits, x, f"hf {key} {fmt} as {ckpt.name}") <= TOL


def test_hf_config_without_defaults(hf_dirs, tmp_path):
    # A config.json saved with `use_diff` leaves out what equals transformers' defaults.
    st, _, x, logits = hf_dirs["vit"]
    config = json.loads((st / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps", "num_channels", "qkv_bias"):
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((st / "model.safetensors").read_bytes())
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.overrides["norm_eps"] == 1e-12
    assert max_diff(vitkit.create_model(ckpt.name, pretrained=tmp_path, **ckpt.overrides), logits, x,
                    "hf vit, config without defaults") <= TOL


def test_hf_vit_base_224(tmp_path):
    hf = _hf("ViTForImageClassification", "ViTConfig")  # the defaults: ViT-B/16 at 224
    hf.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = hf(pixel_values=x).logits
    del hf
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.name == "vit_base_patch16_224" and ckpt.overrides == {"num_classes": 2, "norm_eps": 1e-12}
    ours = vitkit.create_model("vit_base_patch16_224", pretrained=tmp_path, **ckpt.overrides)
    assert max_diff(ours, logits, x, "hf vit base 224") <= TOL


def test_hf_cvt(tmp_path):
    pytest.importorskip("vitkit.convert.hf_cvt")
    # Stage depths >= stage index + 1: transformers indexes its per-block drop-path list by the stage.
    two = lambda a, b: [a, b]  # noqa: E731
    hf = _hf("CvtForImageClassification", "CvtConfig", num_labels=5, embed_dim=two(16, 32), depth=two(1, 2),
             num_heads=two(1, 2), patch_sizes=two(7, 3), patch_stride=two(4, 2), patch_padding=two(2, 1),
             mlp_ratio=two(4.0, 4.0), attention_drop_rate=two(0.0, 0.0), drop_rate=two(0.0, 0.0),
             drop_path_rate=two(0.0, 0.0), qkv_bias=two(True, True), cls_token=two(False, True),
             qkv_projection_method=two("dw_bn", "dw_bn"), kernel_qkv=two(3, 3), padding_kv=two(1, 1),
             stride_kv=two(2, 2), padding_q=two(1, 1), stride_q=two(1, 1))
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    ckpt = read_checkpoint(tmp_path)
    ours = vitkit.create_model(ckpt.name, pretrained=tmp_path, **ckpt.overrides)
    assert max_diff(ours, hf(pixel_values=x).logits.detach(), x, f"hf cvt as {ckpt.name}") <= TOL


def test_timm_hub_directory(tmp_path):
    ref = perturb(timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=3))
    save_file(ref.state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "architecture": "deit_tiny_patch16_224", "num_classes": 3, "label_names": ["cat", "dog", "eel"],
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    out = convert(tmp_path, tmp_path / "run")
    run = vitkit.load_run(out)
    assert run.classes == ["cat", "dog", "eel"]
    x = torch.randn(1, 3, 224, 224)
    assert max_diff(run.model, ref(x).detach(), x, "timm hub dir deit_tiny") <= TOL
    # `architecture` names the model; another name of the family adopts its widths.
    assert max_diff(vitkit.create_model(pretrained=tmp_path), ref(x).detach(), x, "timm hub dir, no name") <= TOL
    with pytest.warns(UserWarning, match="adopting the checkpoint's num_classes=3, embed_dim=192, num_heads=3"):
        ours = vitkit.create_model("deit_small_patch16_224", pretrained=tmp_path)
    assert max_diff(ours, ref(x).detach(), x, "timm hub dir as deit_small") <= TOL


# -- Hugging Face directories saved with transformers' default configs --------------------------------
# Only the sizes are set: layer_norm_eps stays transformers' 1e-12 (Swin: 1e-5), qkv bias, BEiT's
# pooling and layer scale their defaults; every case has 10 classes. Each with the registered name
# whose defaults it differs from.
TEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
           patch_size=8, num_labels=10)
HF_DEFAULT_CASES = {
    "vit": ("ViTForImageClassification", "ViTConfig", TEN, "vit_base_patch16_224"),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", TEN, "deit_base_distilled_patch16_224"),
    "swin": ("SwinForImageClassification", "SwinConfig",
             dict(image_size=32, patch_size=2, embed_dim=48, depths=[2, 2, 2], num_heads=[3, 6, 12], window_size=4,
                  num_labels=10), "swin_tiny_patch4_window7_224"),
    "beit": ("BeitForImageClassification", "BeitConfig", TEN, "beit_base_patch16_224"),
    # Three stages, as the default; depth >= stage index + 1 (transformers indexes drop path by stage).
    "cvt": ("CvtForImageClassification", "CvtConfig",
            dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3], num_labels=10), "cvt_13"),
}


@pytest.fixture(scope="module")
def hf_default_dirs(tmp_path_factory):
    out = {}
    for key, (cls, cfg, kw, _) in HF_DEFAULT_CASES.items():
        model = _hf(cls, cfg, **kw)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            logits = model(pixel_values=x).logits
        path = tmp_path_factory.mktemp(f"default_{key}")
        model.save_pretrained(path)
        out[key] = (path, x, logits, model)
    return out


@pytest.mark.parametrize("key", HF_DEFAULT_CASES)
def test_hf_default_configs_build_themselves(key, hf_default_dirs):
    path, x, logits, _ = hf_default_dirs[key]
    name = HF_DEFAULT_CASES[key][3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no name: the checkpoint's architecture is what was asked for
        ours = vitkit.create_model(pretrained=path)
    assert ours.cfg.num_classes == 10 and ours.cfg.norm_eps == (1e-12 if key in ("vit", "deit", "beit") else 1e-5)
    assert max_diff(ours, logits, x, f"hf default {key}, no name") <= TOL
    # With a name, what differs from the variant is adopted, all in one line.
    with pytest.warns(UserWarning) as record:
        ours = vitkit.create_model(name, pretrained=path)
    lines = [str(w.message) for w in record if "adopting" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0] and "num_classes=10" in lines[0], lines
    if key in ("vit", "deit", "beit"):
        assert "norm_eps=1e-12" in lines[0]
    assert max_diff(ours, logits, x, f"hf default {key} as {name}") <= TOL


def test_hf_explicit_num_classes(hf_default_dirs):
    path, x, logits, _ = hf_default_dirs["vit"]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        same = vitkit.create_model("vit_base_patch16_224", pretrained=path, num_classes=10)
    assert not [w for w in record if "classifier" in str(w.message)]
    assert max_diff(same, logits, x, "hf vit, num_classes=10 given") <= TOL
    with pytest.warns(UserWarning, match="re-initialising the classifier for 3 classes: .* has 10"):
        new = vitkit.create_model("vit_base_patch16_224", pretrained=path, num_classes=3).eval()
    assert new.head.weight.shape == (3, 64)
    with torch.no_grad():
        assert torch.allclose(new.forward_features(x), same.eval().forward_features(x))


def test_hf_labels_become_the_run_classes(tmp_path):
    names = ["cat", "dog", "eel"]
    hf = _hf("ViTForImageClassification", "ViTConfig", **{**TEN, "num_labels": 3},
             id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    hf.save_pretrained(tmp_path / "hf")
    assert read_checkpoint(tmp_path / "hf").classes == names
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert vitkit.load_run(tmp_path / "run").classes == names


def test_hf_and_jax_into_one_channel(hf_default_dirs, tmp_path):
    """A grey image through the adapted model gives what the RGB original gives on its grey copy."""
    grey = torch.randn(2, 1, 32, 32)
    path, _, _, hf = hf_default_dirs["vit"]
    with torch.no_grad():
        ref = hf(pixel_values=grey.repeat(1, 3, 1, 1)).logits
    for model in (None, "vit_base_patch16_224"):
        with pytest.warns(UserWarning, match="3-channel images, the model takes 1: adapting the first convolution"):
            ours = vitkit.create_model(model, pretrained=path, in_chans=1)
        assert max_diff(ours, ref, grey, f"hf vit into 1 channel, name {model}") <= TOL
    vit = small_timm_vit()
    np.savez(tmp_path / "vit.npz", **jax_arrays(vit, "google"))
    with pytest.warns(UserWarning, match="adapting the first convolution patch_embed.proj"):
        ours = vitkit.create_model(pretrained=tmp_path / "vit.npz", in_chans=1)
    assert max_diff(ours, vit(grey.repeat(1, 3, 1, 1)).detach(), grey, "jax vit into 1 channel") <= TOL


# -- JAX .npz ----------------------------------------------------------------------------------------
# Encoder-block sub-module names (attention, second norm, MLP) of the two code bases.
JAX_BLOCK = {"google": ("MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"),
             "big_vision": ("MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0")}


def jax_arrays(model: torch.nn.Module, naming: str, *, prefix: str = "", scanned: bool = False) -> dict[str, np.ndarray]:
    """A timm ViT's weights under flax names and layouts (the inverse of timm's `_load_weights`)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    D, H = model.embed_dim, model.blocks[0].attn.num_heads
    attn, ln2, mlp = JAX_BLOCK[naming]
    a = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
         "embedding/bias": sd["patch_embed.proj.bias"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    if "cls_token" in sd:
        a["cls"] = sd["cls_token"]
    if naming == "google":
        a["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
    elif "pos_embed" in sd:  # big_vision's table has no class-token entry (the reference's is zero)
        a["pos_embedding"] = sd["pos_embed"][:, model.num_prefix_tokens:]
    blocks = []
    for i in range(len(model.blocks)):
        p = f"blocks.{i}."
        b = {"LayerNorm_0/scale": sd[p + "norm1.weight"], "LayerNorm_0/bias": sd[p + "norm1.bias"],
             f"{ln2}/scale": sd[p + "norm2.weight"], f"{ln2}/bias": sd[p + "norm2.bias"],
             f"{attn}/out/kernel": sd[p + "attn.proj.weight"].T.reshape(H, D // H, D),
             f"{attn}/out/bias": sd[p + "attn.proj.bias"]}
        for j, n in enumerate(("query", "key", "value")):
            b[f"{attn}/{n}/kernel"] = sd[p + "attn.qkv.weight"][j * D:(j + 1) * D].T.reshape(D, H, D // H)
            b[f"{attn}/{n}/bias"] = sd[p + "attn.qkv.bias"][j * D:(j + 1) * D].reshape(H, D // H)
        for r in range(2):
            b[f"{mlp}/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            b[f"{mlp}/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
        blocks.append(b)
    if scanned:
        a.update({f"Transformer/encoderblock/{k}": np.stack([b[k] for b in blocks]) for k in blocks[0]})
    else:
        a.update({f"Transformer/encoderblock_{i}/{k}": v for i, b in enumerate(blocks) for k, v in b.items()})
    return {prefix + k: v for k, v in a.items()}


def _load_npz(path):
    ckpt = read_checkpoint(path)
    return vitkit.create_model(ckpt.name, pretrained=path, **ckpt.overrides)


def test_jax_google_research(tmp_path):
    ref = small_timm_vit()
    np.savez(tmp_path / "vit.npz", **jax_arrays(ref, "google"))
    # The writer agrees with timm's own reader...
    check = timm_vit.VisionTransformer(**SMALL_VIT)
    timm_vit._load_weights(check, str(tmp_path / "vit.npz"))
    assert all(torch.equal(v, check.state_dict()[k]) for k, v in ref.state_dict().items())
    # ...and vitkit reads it into the same function.
    x = torch.randn(2, 3, 32, 32)
    assert max_diff(_load_npz(tmp_path / "vit.npz"), ref(x).detach(), x, "jax google-research token") <= TOL


@pytest.mark.parametrize("variant", ["gap_learned", "token_scanned", "gap_sincos"])
def test_jax_big_vision(variant, tmp_path):
    if variant == "token_scanned":
        ref = small_timm_vit()
        with torch.no_grad():
            ref.pos_embed[:, 0] = 0  # big_vision's class token has no position
    else:
        ref = small_timm_vit(class_token=False, global_pool="avg", fc_norm=False)
        if variant == "gap_sincos":
            with torch.no_grad():
                ref.pos_embed.copy_(sincos_2d_pos_embed((4, 4), 64))
    arrays = jax_arrays(ref, "big_vision", prefix="params/", scanned=variant == "token_scanned")
    if variant == "gap_sincos":
        del arrays["params/pos_embedding"]
    np.savez(tmp_path / "vit.npz", **arrays)
    x = torch.randn(2, 3, 32, 32)
    ours = _load_npz(tmp_path / "vit.npz")
    assert ours.cfg.pos_embed == ("sincos" if variant == "gap_sincos" else "learn")
    assert max_diff(ours, ref(x).detach(), x, f"jax big_vision {variant}") <= TOL


def test_jax_pre_logits_dropped_with_head(tmp_path):
    arrays = jax_arrays(small_timm_vit(), "google")
    arrays.update({"pre_logits/kernel": np.zeros((64, 64), np.float32), "pre_logits/bias": np.zeros(64, np.float32)})
    np.savez(tmp_path / "vit.npz", **arrays)
    with pytest.warns(UserWarning, match="pre-logits"):
        ckpt = read_checkpoint(tmp_path / "vit.npz")
    assert ckpt.overrides["num_classes"] == 0 and not any(k.startswith("head") for k in ckpt.state)


# -- errors ------------------------------------------------------------------------------------------
def test_error_unsupported_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "convnext"}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model_type 'convnext' is not supported; supported: vit, deit"):
        vitkit.create_model("vit_base_patch16_224", pretrained=tmp_path)


def test_error_hf_architecture_mismatch(hf_dirs):
    st = hf_dirs["vit"][0]
    ckpt = read_checkpoint(st)
    # An explicit override wins over the checkpoint; one that changes no shape but the computation fails.
    with pytest.raises(ValueError, match="num_heads=4, the model has num_heads=8"):
        vitkit.create_model(ckpt.name, pretrained=st, num_heads=8)
    # An explicit epsilon other than transformers' 1e-12 loads, warning that outputs differ slightly.
    with pytest.warns(UserWarning, match="trained with norm_eps=1e-12.*differ slightly"):
        vitkit.create_model(ckpt.name, pretrained=st, norm_eps=1e-6)
    # A name of another family is taken at its word: nothing is adopted, the differences are listed.
    with pytest.raises(ValueError, match="was trained with .*embed_dim=64.*distilled=False"):
        vitkit.create_model("deit_base_distilled_patch16_224", pretrained=st)


def test_error_npz_map_head(tmp_path):
    arrays = jax_arrays(small_timm_vit(class_token=False, global_pool="avg", fc_norm=False), "big_vision",
                        prefix="params/")
    arrays["params/MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    np.savez(tmp_path / "map.npz", **arrays)
    with pytest.raises(ValueError, match="MAPHead"):
        read_checkpoint(tmp_path / "map.npz")


def test_error_timm_unexpected_key(tmp_path):
    state = small_timm_vit().state_dict()
    state["blocks.0.attn.extra_scale"] = torch.ones(4)
    torch.save(state, tmp_path / "vit.pth")
    ours = vitkit.create_model("vit_base_patch16_224", **SMALL_VIT)
    with pytest.raises(ValueError, match=r"unexpected \['blocks.0.attn.extra_scale'\]"):
        load_pretrained(ours, tmp_path / "vit.pth", num_classes_given=False)
    with pytest.raises(ValueError, match="extra_scale"), pytest.warns(UserWarning):  # with a new head too
        vitkit.create_model("vit_base_patch16_224", pretrained=tmp_path / "vit.pth", **{**SMALL_VIT, "num_classes": 3})


def test_error_hub_id_offline(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.chdir(tmp_path)  # so that `no-such-org/vit` is not a local path either
    with pytest.raises(OSError, match="not in the local Hugging Face cache .* offline .*hf download no-such-org/vit"):
        vitkit.create_model("vit_base_patch16_224", pretrained="no-such-org/vit")
    assert main(["convert", "no-such-org/vit", str(tmp_path / "out")]) == 2


def test_detect_format(tmp_path, hf_dirs):
    assert detect_format(hf_dirs["vit"][0]) == "hf"
    for name, fmt in (("a.npz", "jax-npz"), ("a.safetensors", "safetensors"), ("a.pth", "torch"), ("a.bin", "torch")):
        (tmp_path / name).touch()
        assert detect_format(tmp_path / name) == fmt
    (tmp_path / "a.h5").touch()
    with pytest.raises(ValueError, match="unknown weights format '.h5'"):
        detect_format(tmp_path / "a.h5")


# -- vitkit convert -> load_run ----------------------------------------------------------------------
@pytest.mark.parametrize("key", ["vit", "swin"])
def test_cli_convert_hf_then_predict(key, hf_dirs, tmp_path):
    st, _, x, logits = hf_dirs[key]
    out = tmp_path / "run"
    assert main(["convert", str(st), str(out)]) == 0
    run = vitkit.load_run(out)
    assert run.classes == [f"LABEL_{i}" for i in range(logits.shape[1])]  # id2label
    preds = run.predict([Image.new("RGB", (40, 30), (200, 30, 90))], topk=2)
    assert len(preds[0]) == 2 and preds[0][0][0] in run.classes
    assert max_diff(run.model, logits, x, f"vitkit convert hf {key} -> load_run") <= TOL


def test_cli_convert_timm_and_npz(tmp_path):
    # A timm file names no architecture: --model gives it, the class count and image size are read.
    tiny = perturb(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=5))
    torch.save({"model": tiny.state_dict()}, tmp_path / "vit.pth")
    ref = small_timm_vit()
    np.savez(tmp_path / "vit.npz", **jax_arrays(ref, "google"))
    assert main(["convert", str(tmp_path / "vit.pth"), str(tmp_path / "no")]) == 2  # timm files need --model
    for src, extra, net, side in (("vit.pth", ["--model", "vit_tiny_patch16_224"], tiny, 64), ("vit.npz", [], ref, 32)):
        out = tmp_path / f"run_{src}"
        assert main(["convert", str(tmp_path / src), str(out), *extra]) == 0
        run = vitkit.load_run(out)
        assert run.classes == [str(i) for i in range(5)] and run.img_size == (side, side)
        x = torch.randn(2, 3, side, side)
        assert max_diff(run.model, net(x).detach(), x, f"vitkit convert {src} -> load_run") <= TOL
    # A new class count and image size: the head is new, positions resampled.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert main(["convert", str(tmp_path / "vit.npz"), str(tmp_path / "run48"), "--num-classes", "3",
                     "--img-size", "48"]) == 0
    run = vitkit.load_run(tmp_path / "run48")
    assert run.classes == ["0", "1", "2"] and run.model(torch.randn(1, 3, 48, 48)).shape == (1, 3)


def test_run_directory_as_pretrained(tmp_path, hf_dirs):
    st, _, x, logits = hf_dirs["beit"]
    convert(st, tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run")
    ours = vitkit.create_model(ckpt.name, **ckpt.overrides)
    load_pretrained(ours, tmp_path / "run", num_classes_given=False)
    assert max_diff(ours, logits, x, "vitkit run dir as pretrained") <= TOL
    # A run names its architecture: no model name is needed, and a name of the family adopts it.
    assert max_diff(vitkit.create_model(pretrained=tmp_path / "run"), logits, x, "run dir, no name") <= TOL
    with pytest.warns(UserWarning, match="adopting the checkpoint's .*embed_dim=64"):
        ours = vitkit.create_model("beit_pico_patch4_28", pretrained=tmp_path / "run")
    assert max_diff(ours, logits, x, "run dir as beit_pico") <= TOL


def test_hub_id_loads_offline_from_the_local_cache(monkeypatch, tmp_path):
    """A model id resolves from the Hugging Face cache with no network: a random-initialised timm
    DINOv2 placed in a temporary cache in the hub's layout (models--org--name/snapshots/REV, refs/main)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    ref = perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=56))
    repo = tmp_path / "cache" / "models--timm--vit_small_patch14_reg4_dinov2.lvd142m"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    save_file(ref.state_dict(), snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0,
        "pretrained_cfg": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    x = torch.randn(1, 3, 56, 56)
    for src in ("hf-hub:timm/vit_small_patch14_reg4_dinov2.lvd142m", "timm/vit_small_patch14_reg4_dinov2.lvd142m"):
        ours = vitkit.create_model(pretrained=src)  # the architecture (and its depth, size) from the files
        assert ours.num_prefix_tokens == 5 and max_diff(ours, ref(x).detach(), x, src) <= TOL
    with pytest.raises(OSError, match=r"timm/vit_small_patch14_dinov2\.lvd142m, and as a hub id it is not in the local "
                                      r"Hugging Face cache"):
        vitkit.create_model(pretrained="hf-hub:timm/vit_small_patch14_dinov2.lvd142m")


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_release_files(name, tmp_path):
    """facebookresearch/dinov2's layout (a [MASK] token; with registers `register_tokens` and a position
    embedding for the class token) converts to timm's and gives timm's outputs."""
    ref = perturb(timm.create_model(name, pretrained=False, img_size=56, depth=2))
    sd = dict(ref.state_dict(), mask_token=torch.randn(1, 384))
    if "reg_token" in sd:
        cls_pos = torch.randn(1, 1, 384)
        sd.update(register_tokens=sd.pop("reg_token"), cls_token=sd["cls_token"] - cls_pos,
                  pos_embed=torch.cat([cls_pos, sd["pos_embed"]], dim=1))
    torch.save(sd, tmp_path / "dinov2.pth")
    ours = vitkit.create_model(name, pretrained=tmp_path / "dinov2.pth", img_size=56, depth=2)
    x = torch.randn(2, 3, 56, 56)
    assert max_diff(ours, ref(x).detach(), x, name) <= TOL
