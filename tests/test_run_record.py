"""The run record: one typed reader and writer, run directories of the previous release still load,
and nothing outside `vitkit.run` reads a run's config by key."""

import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitkit
from vitkit.engine import evaluate_run
from vitkit.run import CONFIG, SCHEMA_VERSION, RunRecord, load_run, save_weights

V1 = Path(__file__).parent / "data" / "v1_runs"  # config.yaml files as vitkit 0.1 wrote them
SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"


def _with_weights(name: str, tmp_path: Path) -> Path:
    """A copy of a v1 run directory with random weights of the architecture its record describes."""
    run = tmp_path / name
    shutil.copytree(V1 / name, run)
    rec = RunRecord.read(run)
    torch.manual_seed(0)
    save_weights(run / "model.safetensors", vitkit.create_model(rec.model, **rec.model_args).state_dict())
    return run


@pytest.mark.parametrize("name, objective, classes, data", [
    ("train_run", "classify", 10, "digits"), ("distill_run", "distill", 10, "digits"),
    ("mae_run", "mae", 0, "digits"), ("beit_run", "beit", 0, "digits"), ("conv_run", "converted", 5, None),
])
def test_v1_records_read_with_every_field(name, objective, classes, data):
    rec = RunRecord.read(V1 / name)
    assert rec.objective == objective and len(rec.classes) == classes and rec.data == data
    assert rec.schema == 1 and rec.in_chans == 1 and rec.mode == "L" and len(rec.img_size) == 2
    if objective in ("classify", "distill"):
        assert rec.tta and (rec.tta_flip, rec.tta_shift) == (False, 1) and rec.ema and rec.precision in ("bf16", "fp32")
        assert rec.seed == 0 and rec.val_fraction == 0.2 and rec.img_size == (16, 16)


def test_a_v1_run_loads_predicts_and_evaluates(tmp_path):
    run_dir = _with_weights("train_run", tmp_path)
    run = load_run(run_dir)
    assert run.weights == "raw" and run.img_size == (16, 16)
    img = tmp_path / "digit.png"
    Image.new("L", (20, 20), 128).save(img)
    top = run.predict([img], topk=3)[0]
    assert len(top) == 3 and {c for c, _ in top} <= set(run.classes)
    result = evaluate_run(run_dir, report_dir=None)
    assert result["n"] == 360 and result["tta_views"] == 5  # the test-time views the record names


def test_a_pre_training_run_has_no_classifier_to_predict_with(tmp_path):
    run = load_run(_with_weights("mae_run", tmp_path))
    with pytest.raises(ValueError, match="pre-training run.*vitkit train --pretrained"):
        run.predict([Image.new("L", (16, 16))])


def test_write_then_read_is_the_same_record(tmp_path):
    rec = RunRecord.read(V1 / "distill_run")
    rec.write(tmp_path)
    again = RunRecord.read(tmp_path)
    assert again == RunRecord(**{**rec.__dict__})
    assert "schema: 1" in (tmp_path / CONFIG).read_text()  # the record keeps the version it was written with


def test_bad_or_newer_records_are_one_clear_error(tmp_path):
    (tmp_path / CONFIG).write_text("just a string\n")
    with pytest.raises(ValueError, match="cannot read .*config.yaml"):
        RunRecord.read(tmp_path)
    (tmp_path / CONFIG).write_text(f"schema: {SCHEMA_VERSION + 1}\nmodel: x\n")
    with pytest.raises(ValueError, match="newer than this vitkit"):
        RunRecord.read(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a vitkit run directory"):
        RunRecord.read(tmp_path / "missing")


def test_only_the_run_module_reads_the_config_file():
    """No other module opens config.yaml, parses YAML, or indexes a record's settings by key."""
    offenders = []
    for f in SRC.rglob("*.py"):
        if f.name == "run.py" and f.parent == SRC:
            continue
        text = f.read_text()
        if re.search(r"yaml\.|safe_load|\.settings\[|\.config\[\"(train|data|model|eval|pretrain)\"\]", text):
            offenders.append(str(f.relative_to(SRC)))
    assert not offenders, offenders
