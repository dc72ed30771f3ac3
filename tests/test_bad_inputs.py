"""Bad inputs, one table per kind: each gets its clear error or its documented skip.

See docs/reliability.md for the guarantees these tests hold up.
"""

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.data import SkipLog, check_image, load_data, load_image, make_loader
import vitkit.run as vrun
from vitkit.engine import TrainConfig, train

# -- images ---------------------------------------------------------------------------------------


def _png_bytes(mode="RGB", size=(12, 10)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0]), dtype=np.uint8)
    Image.fromarray(arr, "RGB" if mode == "RGB" else "L").save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


DAMAGED = {  # file name -> bytes; every one must be skipped with a reason, or be an error under --strict
    "corrupt.png": b"\x89PNG\r\n\x1a\n" + os.urandom(200),
    "truncated.png": _png_bytes(size=(64, 64))[:300],
    "truncated.jpg": _jpeg_bytes()[:400],
    "not_an_image.jpg": b"these are not the pixels you are looking for\n",
    "zero_bytes.png": b"",
}


def _good_folder(root: Path, classes=("a", "b"), n=4) -> Path:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.png").write_bytes(_png_bytes())
    return root


def _read_all(bundle, skips, num_workers=0) -> int:
    """Read both splits of a folder bundle as training does; the number of images that came out."""
    args = dict(batch_size=4, img_size=(8, 8), mean=bundle.mean, std=bundle.std, train=False, skips=skips,
                num_workers=num_workers)
    return sum(len(y) for split in (bundle.train, bundle.val) for _, y in make_loader(split, **args))


@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_image_is_skipped_when_read_and_listed_once_or_strict_error(tmp_path, name):
    root = _good_folder(tmp_path / "data")
    (root / "a" / name).write_bytes(DAMAGED[name])
    with pytest.raises(ValueError, match=f"cannot read image .*{name}"):
        check_image(root / "a" / name)
    bundle = load_data(str(root))  # listed, not decoded: nothing is known to be damaged yet
    assert len(bundle.train) + len(bundle.val) == 9 and not bundle.skipped
    log = tmp_path / "skipped_files.txt"
    workers = 2 if name == "truncated.jpg" else 0  # once through DataLoader worker processes
    with pytest.warns(UserWarning, match=f"skipped damaged image .*{name}"):
        assert _read_all(bundle, SkipLog(log), workers) == 8
    assert [line.split("\t")[0] for line in log.read_text().splitlines()] == [str(root / "a" / name)]
    _read_all(bundle, SkipLog(log), workers)  # a second pass (a resumed run) lists nothing twice
    assert len(log.read_text().splitlines()) == 1
    with pytest.raises(ValueError, match=f"damaged image \\(strict mode\\).*{name}"):
        _read_all(load_data(str(root), strict=True), SkipLog(strict=True), workers)


def test_data_check_decodes_every_image_and_lists_what_training_would_skip(tmp_path, capsys):
    from vitkit.cli import main

    root = _good_folder(tmp_path / "data", classes=("a", "b", "c"), n=3)
    assert main(["data", "check", str(root)]) == 0
    assert "9 usable images" in capsys.readouterr().out
    (root / "a" / "broken.png").write_bytes(DAMAGED["truncated.png"])
    for f in (root / "c").iterdir():
        f.unlink()
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "6 usable images" in out and "2 classes: a 3, b 3" in out and "modes: RGB 6" in out
    assert "broken.png: cannot read image" not in out and "broken.png: " in out  # PIL's reason, as training lists it
    assert f"{root / 'c'}: class folder without usable images" in out
    assert main(["data", "check", str(tmp_path / "missing")]) == 2


def test_decompression_bomb_is_skipped(tmp_path, monkeypatch):
    root = _good_folder(tmp_path / "data")
    Image.new("L", (400, 400)).save(root / "b" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 400x400 is over twice the limit
    skips = SkipLog()
    with pytest.warns(UserWarning, match="skipped damaged image .*huge.png"):
        assert _read_all(load_data(str(root)), skips) == 8
    assert "decompression bomb" in skips.met[str(root / "b" / "huge.png")].lower()


def test_run_lists_skipped_files_as_it_meets_them(tmp_path):
    root = _good_folder(tmp_path / "data", n=6)
    (root / "b" / "broken.png").write_bytes(DAMAGED["corrupt.png"])
    (root / "c").mkdir()  # an empty class folder: left out when the folder is listed
    with pytest.warns(UserWarning, match="skipped damaged image .*broken.png"):
        run_dir = train(TrainConfig(data=str(root), img_size=8, model_args={"depth": 1}, epochs=2, warmup_epochs=0,
                                    num_workers=0, out=str(tmp_path / "run")))
    listed = (run_dir / vrun.SKIPPED).read_text().splitlines()  # read in both epochs, listed once
    assert listed == [f"{root / 'c'}\tclass folder without usable images", listed[1]]
    assert listed[1].startswith(f"{root / 'b' / 'broken.png'}\t") and "cannot identify" in listed[1]


@pytest.mark.parametrize(
    "layout, error",
    [
        ({"only": 3}, "needs at least two class folders"),
        ({"a": 0, "b": 0}, "no usable images"),
        ({}, "no usable images"),
    ],
)
def test_folders_that_cannot_train_fail_before_training(tmp_path, layout, error):
    for c, n in layout.items():
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.png").write_bytes(_png_bytes())
    with pytest.raises(ValueError, match=error):
        with pytest.warns(UserWarning) if any(n == 0 for n in layout.values()) else _nullcontext():
            load_data(str(tmp_path))


def test_empty_class_folder_is_skipped_and_listed(tmp_path):
    root = _good_folder(tmp_path / "data", classes=("a", "b", "c"))
    for f in (root / "c").iterdir():
        f.unlink()
    with pytest.warns(UserWarning, match="skipped 1"):
        bundle = load_data(str(root))
    assert bundle.classes == ["a", "b"] and bundle.skipped[0][1] == "class folder without usable images"
    with pytest.raises(ValueError, match="class folder .*c has no usable images"):
        load_data(str(root), strict=True)


def test_missing_folder_and_classes_only_in_val(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        load_data(str(tmp_path / "missing"))
    _good_folder(tmp_path / "tv" / "train")
    _good_folder(tmp_path / "tv" / "val", classes=("a", "b", "z"), n=1)
    with pytest.raises(ValueError, match="classes that .*train lacks: \\['z'\\]"):
        load_data(str(tmp_path / "tv"))


def test_mixed_modes_load_as_rgb_with_right_values(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.new("L", (6, 6), 200).save(root / "a" / "gray.png")
    Image.new("RGBA", (6, 6), (10, 20, 30, 0)).save(root / "a" / "rgba.png")
    Image.new("P", (6, 6), 3).save(root / "b" / "palette.png")
    Image.fromarray(np.full((6, 6), 60000, dtype=np.uint16)).save(root / "b" / "wide16.png")
    Image.new("RGB", (6, 6), (1, 2, 3)).save(root / "b" / "rgb.jpg")
    bundle = load_data(str(root), val_fraction=0.4)
    assert bundle.in_chans == 3 and not bundle.skipped
    assert load_image(root / "a" / "rgba.png").getpixel((0, 0)) == (10, 20, 30)
    arr16 = np.zeros((6, 6), dtype=np.uint16)
    arr16[0, 0] = 65535
    Image.fromarray(arr16).save(root / "b" / "ramp16.png")
    # 16-bit is rescaled, not clipped to white: 0 -> 0, the maximum -> 255.
    assert load_image(root / "b" / "ramp16.png", "L").getpixel((0, 0)) == 255
    assert load_image(root / "b" / "ramp16.png", "L").getpixel((1, 1)) == 0


def test_grayscale_folder_with_16_bit_images_trains_one_channel(tmp_path):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.new("L", (6, 6), 9).save(root / c / "8bit.png")
        Image.fromarray(np.arange(36, dtype=np.uint16).reshape(6, 6) * 1000).save(root / c / "16bit.png")
    assert load_data(str(root), val_fraction=0.5).in_chans == 1


def test_exif_rotation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def test_predict_reports_bad_images_and_goes_on(tmp_path, capsys):
    run_dir = train(TrainConfig(data="digits", img_size=8, model_args={"depth": 1}, epochs=1, warmup_epochs=0,
                                out=str(tmp_path / "run")))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "ok.png").write_bytes(_png_bytes("L"))
    (tmp_path / "imgs" / "bad.png").write_bytes(b"")
    assert main(["predict", str(run_dir), str(tmp_path / "imgs")]) == 1
    out, err = capsys.readouterr()
    assert "ok.png" in out and "bad.png" not in out and "skipped cannot read image" in err and "bad.png" in err
    assert main(["predict", str(run_dir), str(tmp_path / "nope.png")]) == 2
    assert "no such image or folder" in capsys.readouterr().err


# -- configuration and CLI ------------------------------------------------------------------------

CONFIG_ERRORS = [  # argv after `vitkit train`, text the one-line error must contain
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    (["--lr", "-1"], "lr=-1.0 is invalid: must be > 0"),
    (["--batch-size", "0"], "batch_size=0 is invalid: must be >= 1"),
    (["--batch-size", "many"], 'Parser key "batch_size"'),
    (["--img-size", "30"], "img_size 30 is not a multiple of patch_size 4"),
    (["--precision", "fp8"], "fp32"),
    (["--augment", "heavy"], "light"),
    (["--auto-augment", "randomaug"], "trivialaugment"),
    (["--mixup", "-0.5"], "mixup=-0.5 is invalid: must be >= 0"),
    (["--layer-decay", "1.5"], "layer_decay=1.5 is invalid: must be in (0, 1]"),
    (["--accum-steps", "0"], "accum_steps=0 is invalid: must be >= 1"),
    (["--ema", "1.0"], "ema=1.0 is invalid"),
    (["--pretrained", "/no/such/run"], "--model must name the architecture"),
    (["--distill", "hard"], "distill='hard' is invalid: must be none without a --teacher"),
    (["--teacher", "tv:resnet18"], "needs --teacher-weights"),
    (["--teacher", "tv:resnet18", "--teacher-weights", "{teacher_3_classes}"], "for the data's 10 classes"),
    (["--model-args", "{dpeth: 3}"], "unknown override 'dpeth'"),
    (["--model-args", "{depth: three}"], "override depth='three'"),
    (["--warmup-epochs", "50"], "warmup_epochs=50 is longer than the run (epochs=40)"),
    (["--data", "/no/such/folder"], "unknown data set '/no/such/folder'"),
    (["--resume", "/no/such/run"], "not a vitkit run directory"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--nope", "1"], "unrecognized arguments: --nope"),
]


@pytest.mark.parametrize("argv, message", CONFIG_ERRORS, ids=[" ".join(a) for a, _ in CONFIG_ERRORS])
def test_config_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    if "{teacher_3_classes}" in argv:  # a teacher trained on other classes than the data's
        from safetensors.torch import save_file

        weights = tmp_path / "teacher.safetensors"
        save_file(vitkit.create_model("tv:resnet18", num_classes=3, in_chans=1, img_size=28).state_dict(), weights)
        argv = [str(weights) if a == "{teacher_3_classes}" else a for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # failed before any work


def test_config_file_errors(tmp_path, capsys):
    bad_key, bad_type = tmp_path / "k.yaml", tmp_path / "t.yaml"
    bad_key.write_text("epoch: 3\n")
    bad_type.write_text("epochs: ten\n")
    assert main(["train", "--config", str(bad_key)]) == 2
    assert "epoch" in capsys.readouterr().err
    assert main(["train", "--config", str(bad_type)]) == 2
    assert "epochs" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        main(["--debug", "train", "--model", "vit_nope"])


# -- checkpoints and untrusted files ---------------------------------------------------------------


class Payload:
    """Unpickling this would create a marker file: the tests check it never appears."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickled_payload(tmp_path) -> tuple[bytes, Path]:
    marker = tmp_path / "payload_ran"
    p = Payload()
    p.marker = str(marker)
    buf = io.BytesIO()
    torch.save({"model": {"x": torch.zeros(1)}, "optimizer": p, "epoch": 0, "rng": torch.zeros(1)}, buf)
    return buf.getvalue(), marker


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    return train(TrainConfig(data="digits", img_size=8, model_args={"depth": 1}, epochs=2, warmup_epochs=0, batch_size=64,
                             out=str(out)))


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_pickle_payload_checkpoint_is_refused_without_running(tmp_path, small_run):
    data, marker = _pickled_payload(tmp_path)
    run = _copy_run(small_run, tmp_path / "run")
    (run / vrun.CHECKPOINT).write_bytes(data)
    (run / vrun.PREV_CHECKPOINT).unlink()
    with pytest.raises(ValueError, match="cannot resume .*cannot read checkpoint .*checkpoint.pt"):
        train(TrainConfig(resume=str(run)))
    (tmp_path / "w.pth").write_bytes(data)
    with pytest.raises(ValueError, match="cannot read weights from .*w.pth"):
        vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / "w.pth")
    assert not marker.exists()


def test_truncated_checkpoint_falls_back_to_previous(tmp_path, small_run):
    run = _copy_run(small_run, tmp_path / "run")
    data = (run / vrun.CHECKPOINT).read_bytes()
    (run / vrun.CHECKPOINT).write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="resuming from the previous checkpoint"):
        state = vrun.load_resume_state(run)
    assert state["epoch"] == 0
    (run / vrun.PREV_CHECKPOINT).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint .*checkpoint.pt.*checkpoint-prev.pt"):
        vrun.load_resume_state(run)


@pytest.mark.parametrize("name, weights", [(vrun.WEIGHTS, "raw"), (vrun.EMA_WEIGHTS, "auto")])
def test_corrupt_weights_file_names_the_file(tmp_path, small_run, name, weights):
    run = _copy_run(small_run, tmp_path / "run")
    assert (run / vrun.EMA_WEIGHTS).exists()  # runs keep EMA weights by default; load_run prefers them
    (run / name).write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=f"cannot read weights from .*{name}"):
        vitkit.load_run(run, weights=weights)
    if weights == "auto":
        assert main(["eval", str(run)]) == 2


def test_mismatched_weights_list_the_keys(tmp_path, small_run):
    with pytest.raises(ValueError, match="do not fit .*(missing|size mismatch)"):
        vitkit.create_model("deit_pico_distilled_conv4_28", pretrained=small_run)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EACCES])
def test_disk_full_or_permission_error_names_path_and_keeps_old_file(tmp_path, monkeypatch, err):
    target = tmp_path / "model.safetensors"
    vrun.atomic_write(target, b"old")

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match=f"cannot write {target}"):
        vrun.atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left


def test_no_unsafe_torch_load_in_package():
    src = Path(vitkit.__file__).parent
    for f in src.rglob("*.py"):
        for line in f.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"


# -- numerics -------------------------------------------------------------------------------------


def _nan_at(steps: set[int], monkeypatch):
    import vitkit.engine.objectives.classify as engine_train

    real = engine_train.classification_loss
    calls = {"n": 0}

    def loss(*a, **k):
        value = real(*a, **k)
        calls["n"] += 1
        return value * float("nan") if calls["n"] - 1 in steps else value

    monkeypatch.setattr(engine_train, "classification_loss", loss)


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    cfg = dict(data="digits", img_size=8, model_args={"depth": 1}, epochs=2, warmup_epochs=0, batch_size=64,
               out=str(tmp_path / "run"))
    steps_per_epoch = 1437 // 64
    _nan_at({steps_per_epoch + 3}, monkeypatch)
    with pytest.raises(FloatingPointError, match=f"loss is nan at step {steps_per_epoch + 3} \\(epoch 2\\).*--lr.*bf16"):
        train(TrainConfig(**cfg))
    assert vrun.load_checkpoint(tmp_path / "run" / vrun.CHECKPOINT)["epoch"] == 0


def test_skip_nonfinite_tolerates_a_few_steps(tmp_path, monkeypatch):
    cfg = dict(data="digits", img_size=8, model_args={"depth": 1}, epochs=1, warmup_epochs=0, batch_size=64)
    _nan_at({2, 5}, monkeypatch)
    with pytest.warns(UserWarning, match="skipping step 2"):
        run_dir = train(TrainConfig(**cfg, skip_nonfinite=2, out=str(tmp_path / "ok")))
    assert vrun.read_metrics(run_dir)[0]["nonfinite_steps"] == 2
    _nan_at({2, 5}, monkeypatch)
    with pytest.raises(FloatingPointError, match="step 5"):
        train(TrainConfig(**cfg, skip_nonfinite=1, out=str(tmp_path / "stop")))


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
