"""Every run directory has a model card written from the run itself; `vitkit push --dry-run` lists the upload."""

import json
import math
import shutil

import pytest
import torch
import yaml

import vitkit.run as vrun
from vitkit.card import CARD, model_card
from vitkit.cli import main


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_trained_run_has_a_card_stating_what_the_run_holds(digits16_run):
    text = (digits16_run / CARD).read_text()
    meta = _front_matter(text)
    ev = json.loads((digits16_run / vrun.EVAL).read_text())
    rec = vrun.RunRecord.read(digits16_run)
    assert meta["library_name"] == "vitkit" and meta["pipeline_tag"] == "image-classification"
    assert meta["datasets"] == ["digits"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert metrics[0] == {"type": "accuracy", "name": "top-1", "value": round(ev["acc1"], 2)}
    # The model, its size, the data, the recipe, the hardware and time, the use, how to load it.
    n = sum(v.numel() for v in vitkit_weights(digits16_run).values())
    assert f"`vit_pico_conv4_28` ({n / 1e6:.2f}M parameters, 16x16 px, 1 channel)" in text
    assert f"on {ev['n']} images of `digits`" in text
    se = 100 * math.sqrt(ev["acc1"] / 100 * (1 - ev["acc1"] / 100) / ev["n"])
    assert f"+-{se:.1f} points" in text
    assert f"6 epochs in" in text and torch.backends.cpu.get_cpu_capability() in text and rec.hardware in text
    assert "## Intended use and limits" in text and 'vitkit.load_run("' in text and "run.predict" in text


def vitkit_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / vrun.WEIGHTS)


def test_eval_refreshes_the_card(digits16_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits16_run, run)
    (run / CARD).unlink()
    assert main(["eval", str(run), "--no_report"]) == 0
    ev = json.loads((run / vrun.EVAL).read_text())
    assert f"| top-1 | {ev['acc1']:.2f}% |" in (run / CARD).read_text()


def test_a_converted_run_has_a_card_without_results(tmp_path):
    import vitkit
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in vitkit.create_model("vit_pico_patch4_28").state_dict().items()},
              tmp_path / "w.safetensors")
    assert main(["convert", str(tmp_path / "w.safetensors"), str(tmp_path / "run"), "--model", "vit_pico_patch4_28"]) == 0
    text = (tmp_path / "run" / CARD).read_text()
    assert "model-index" not in _front_matter(text) and "Not evaluated" in text and "converted from" in text


def test_push_dry_run_lists_the_upload_and_a_real_push_needs_a_token(digits16_run, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(digits16_run, run)
    assert main(["push", str(run), "--repo-id", "someone/digits", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload to https://huggingface.co/someone/digits:" in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed[:3] == [CARD, "config.yaml", vrun.WEIGHTS] and vrun.EVAL in listed and "checkpoint.pt" not in listed
    constants = pytest.importorskip("huggingface_hub.constants")
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert main(["push", str(run), "--repo-id", "someone/digits"]) == 2
    assert "no Hugging Face token: run `hf auth login` or set HF_TOKEN" in capsys.readouterr().err
    assert main(["push", str(tmp_path), "--repo-id", "someone/digits", "--dry-run"]) == 2  # not a run directory


def test_the_card_of_a_pretraining_run_says_how_to_fine_tune(tmp_path):
    rec = vrun.RunRecord(model="vit_pico_patch4_28", model_args={}, img_size=(28, 28), in_chans=1, mean=(0.5,),
                         std=(0.5,), classes=[], objective="mae", data="mnist5k")
    rec.write(tmp_path)
    import vitkit

    vrun.save_weights(tmp_path / vrun.WEIGHTS, vitkit.create_model("vit_pico_patch4_28").state_dict())
    text = model_card(tmp_path)
    assert "pre-trained as a masked autoencoder" in text and "vitkit train --pretrained" in text
    assert "pipeline_tag" not in _front_matter(text)
