"""Property-based tests (hypothesis) for the config parser and the image loader."""

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from vitkit.cli import build_parser, train_config
from vitkit.data import check_image, load_image
from vitkit.engine import TrainConfig

NUMBERS = st.one_of(st.integers(-5, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing",
                              "val_fraction", "clip_grad", "img_size", "skip_nonfinite"]), value=NUMBERS)
def test_config_parser_accepts_valid_or_names_the_field(field, value):
    """Any value either yields a TrainConfig that holds it, or an error that names the field."""
    argv = ["train", f"--{field}", str(value)]
    try:
        cfg = train_config(build_parser().parse_args(argv)["train"])
    except Exception as e:  # noqa: BLE001 - the property is about which errors and what they say
        assert type(e).__name__ in ("ArgumentError", "ValueError"), repr(e)
        assert field in str(e), str(e)
        return
    assert isinstance(cfg, TrainConfig)
    got = getattr(cfg, field)
    assert got is None or got == got  # a NaN never gets through a range check
    assert cfg.epochs >= 1 and cfg.batch_size >= 1 and cfg.lr > 0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600))
def test_random_bytes_never_crash_the_loader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("img") / "x.png"
    path.write_bytes(data)
    try:
        mode = check_image(path)
    except ValueError as e:
        assert str(path) in str(e)
        return
    assert load_image(path, "RGB").mode == "RGB" and isinstance(mode, str)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]),
       w=st.integers(1, 40), h=st.integers(1, 40), fmt=st.sampled_from(["PNG", "TIFF", "BMP", "JPEG"]),
       cut=st.integers(0, 100))
def test_any_image_loads_or_is_reported(tmp_path_factory, mode, w, h, fmt, cut):
    """Every mode and format either decodes to the asked mode and size, or, truncated, is reported."""
    rng = np.random.default_rng(w * h)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except OSError:
        return  # the format cannot store this mode; nothing to load
    data = buf.getvalue()
    data = data[: max(1, len(data) * cut // 100)] if cut < 100 else data
    path = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
    path.write_bytes(data)
    try:
        check_image(path)
    except ValueError as e:
        assert "cannot read image" in str(e)
        return
    for target in ("L", "RGB"):
        out = load_image(path, target)
        assert out.mode == target and out.size == (w, h)
