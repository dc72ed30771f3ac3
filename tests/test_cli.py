import json
import subprocess
import sys

import pytest
from PIL import Image

from vitkit.cli import main
from vitkit.data import load_data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--data", "digits", "--img-size", "16", "--epochs", "3", "--batch-size", "64",
                 "--warmup-epochs", "1", "--out", str(out)]) == 0
    return out


def test_eval_writes_json(run_dir, capsys):
    assert main(["eval", str(run_dir)]) == 0
    assert "top-1" in capsys.readouterr().out
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["n"] == 360 and 0 <= result["acc1"] <= result["acc5"] <= 100


def test_predict_images_and_folders(run_dir, tmp_path, capsys):
    d = load_data("digits")
    for i in range(4):
        Image.fromarray(d.val.images[i, 0].numpy(), "L").convert("RGB").save(tmp_path / f"{i}.png")
    assert main(["predict", str(run_dir), str(tmp_path), "--topk", "2", "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 4 and all(len(p["top"]) == 2 for p in preds)
    assert all(0 <= t["prob"] <= 1 and t["class"] in [str(i) for i in range(10)] for p in preds for t in p["top"])
    assert main(["predict", str(run_dir), str(tmp_path / "0.png")]) == 0
    assert capsys.readouterr().out.startswith(str(tmp_path / "0.png"))


def test_config_file_and_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: digits\nimg_size: 16\nepochs: 1\nwarmup_epochs: 0\nbatch_size: 999\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--batch-size", "128", "--out", str(out)]) == 0
    from vitkit.run import RunRecord

    saved = RunRecord.read(out).settings
    assert saved["batch_size"] == 128 and saved["epochs"] == 1 and saved["data"] == "digits"


def test_one_epoch_runs_with_the_default_warmup(tmp_path, capsys):
    """A newcomer's first try: the default warmup scales to a short run."""
    assert main(["train", "--epochs", "1", "--data", "digits", "--img-size", "16", "--out", str(tmp_path / "one")]) == 0
    from vitkit.run import RunRecord

    assert RunRecord.read(tmp_path / "one").settings["warmup_epochs"] == 0.5
    assert main(["train", "--warmup-epochs", "5", "--epochs", "3", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warmup_epochs=5" in err and "epochs=3" in err


def test_print_config_groups_the_objective_settings(capsys):
    import yaml

    with pytest.raises(SystemExit):
        main(["train", "--print_config"])
    train = yaml.safe_load(capsys.readouterr().out)
    assert set(train["distill"]) == {"teacher", "teacher_weights", "kind", "alpha", "tau"} and "teacher" not in train
    with pytest.raises(SystemExit):
        main(["pretrain", "--print_config"])
    pre = yaml.safe_load(capsys.readouterr().out)
    assert pre["mae"]["mask_ratio"] == 0.75 and pre["beit"]["mask_ratio"] == 0.4 and pre["epochs"] == 20


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a vitkit run directory" in capsys.readouterr().err
    assert main(["train", "--model", "vit_nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'vit_nope'" in capsys.readouterr().err


def test_models_table(capsys):
    assert main(["models", "deit_small*"]) == 0
    out = capsys.readouterr().out
    assert "deit_small_distilled_patch16_224" in out and "22.44M" in out


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "vitkit.cli", "models", "pico"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "vit_pico_conv4_28" in r.stdout
