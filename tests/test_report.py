"""The evaluation report: numbers against scikit-learn and hand-made cases, files, the HTML page, the CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from vitkit.cli import main
from vitkit.data import load_data
from vitkit.engine import TrainConfig, evaluate_run, train
from vitkit.engine.report import (
    calibration_bins,
    classification_report,
    expected_calibration_error,
    most_confident_wrong,
    plot_confusion_matrix,
    write_report,
)

FILES = ["confusion_matrix.png", "most_confident_wrong.png", "reliability.png", "report.html", "report.json"]


def test_ece_by_hand():
    # Bin (0.9, 1]: two predictions at 0.95, one right: gap |0.5 - 0.95| = 0.45, weight 1/2.
    # Bin (0.6, 0.7]: two at 0.65, both right: gap |1 - 0.65| = 0.35, weight 1/2.  ECE = 0.4.
    conf = torch.tensor([0.95, 0.95, 0.65, 0.65])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.4)
    bins = calibration_bins(conf, correct, n_bins=10)
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert bins[9]["accuracy"] == pytest.approx(0.5) and bins[9]["confidence"] == pytest.approx(0.95)
    # Perfect calibration: in each bin accuracy equals confidence.
    conf = torch.tensor([0.75] * 4 + [0.25] * 4)
    correct = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0]).bool()
    assert expected_calibration_error(conf, correct, n_bins=4) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        calibration_bins(conf, correct, n_bins=0)


def test_per_class_numbers_match_sklearn():
    g = torch.Generator().manual_seed(0)
    K = 6
    targets = torch.randint(0, K - 1, (300,), generator=g)  # class 5 has no support
    logits = torch.randn(300, K, generator=g)
    logits[torch.arange(300), targets] += 1.5
    logits[:, 4] -= 10  # class 4 is never predicted
    classes = [f"c{i}" for i in range(K)]
    r = classification_report(logits, targets, classes)
    pred = logits.argmax(1).numpy()
    p, rec, f1, sup = precision_recall_fscore_support(targets.numpy(), pred, labels=list(range(K)), zero_division=0)
    got = r["per_class"]
    assert [c["class"] for c in got] == classes
    assert np.allclose([c["precision"] for c in got], p) and np.allclose([c["recall"] for c in got], rec)
    assert np.allclose([c["f1"] for c in got], f1) and [c["support"] for c in got] == sup.tolist()
    assert r["confusion_matrix"] == confusion_matrix(targets.numpy(), pred, labels=list(range(K))).tolist()
    mp, mr, mf, _ = precision_recall_fscore_support(targets.numpy(), pred, average="macro", labels=list(range(K)),
                                                    zero_division=0)
    s = r["summary"]
    assert (s["macro_precision"], s["macro_recall"], s["macro_f1"]) == pytest.approx((mp, mr, mf))
    assert s["acc1"] == pytest.approx(100 * (pred == targets.numpy()).mean())
    assert s["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item())
    # The most confused pair is the largest off-diagonal count.
    cm = np.array(r["confusion_matrix"])
    np.fill_diagonal(cm, 0)
    top = r["most_confused"][0]
    assert top["count"] == cm.max() and cm[classes.index(top["true"]), classes.index(top["pred"])] == cm.max()


def test_most_confident_wrong_by_hand():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]))
    targets = torch.tensor([1, 1, 1, 0])  # image 1 is right; wrong: 0 (0.9), 3 (0.7), 2 (0.6)
    wrong = most_confident_wrong(logits, targets, ["a", "b"], k=2)
    assert [w["index"] for w in wrong] == [0, 3]
    assert wrong[0] == {"index": 0, "true": "b", "pred": "a", "confidence": pytest.approx(0.9)}


def test_write_report_files_and_page(tmp_path):
    g = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 3, (40,), generator=g)
    logits = torch.randn(40, 3, generator=g)
    curves = tmp_path / "curves.png"
    Image.new("RGB", (40, 20), "white").save(curves)
    out = tmp_path / "rep"
    r = write_report(out, logits, targets, ["x", "y", "z"], images=lambda i: np.full((8, 8), i, np.uint8),
                     curves=curves, summary={"run": "r<1>", "data": "d"})
    assert sorted(p.name for p in out.iterdir()) == FILES
    saved = json.loads((out / "report.json").read_text())
    assert set(saved) == {"summary", "per_class", "confusion_matrix", "most_confused", "calibration",
                          "most_confident_wrong", "files"}
    assert {"n", "acc1", "acc5", "loss", "ece", "macro_f1", "weighted_f1", "run", "data"} <= set(saved["summary"])
    assert saved["summary"]["run"] == "r<1>" and saved == json.loads(json.dumps(r))
    assert len(saved["calibration"]["bins"]) == 15
    for name in FILES[:3]:
        with Image.open(out / name) as im:
            assert im.format == "PNG"
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # matrix, reliability, wrong grid, curves
    assert "http" not in page and "<script" not in page  # self-contained
    assert "r&lt;1&gt;" in page  # names are escaped


def test_confusion_matrix_readable_with_100_classes():
    K = 100
    cm = np.diag(np.full(K, 20)) + np.eye(K, k=1, dtype=int) * 3
    png = plot_confusion_matrix(cm, [f"class_{i:03d}" for i in range(K)])
    import io

    with Image.open(io.BytesIO(png)) as im:
        # Every class keeps its own labelled row and column of at least ~12 px.
        assert im.width >= 12 * K and im.height >= 12 * K


# -- through evaluate_run and the CLI --------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    return train(TrainConfig(data="digits", img_size=16, epochs=2, batch_size=64, warmup_epochs=1, out=str(out)))


def test_evaluate_run_keeps_its_keys_and_writes_the_report(run_dir, tmp_path):
    at_train = json.loads((run_dir / "eval.json").read_text())  # the run's final evaluation
    r = evaluate_run(run_dir, report_dir=tmp_path / "rep")
    # `vitkit eval` repeats it: EMA weights, 5 views (in-memory digits translate, no flips).
    assert at_train == pytest.approx(r) and r["weights"] == "ema" and r["tta_views"] == 5
    assert {"run", "data", "loss", "acc1", "acc5", "n"} <= set(r) and not {"logits", "targets"} & set(r)
    assert json.loads((run_dir / "eval.json").read_text()) == r
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["summary"]["acc1"] == pytest.approx(r["acc1"]) and rep["summary"]["n"] == r["n"] == 360
    assert sum(c["support"] for c in rep["per_class"]) == 360
    assert evaluate_run(run_dir) == r  # no report without report_dir


def test_cli_eval_report(run_dir, tmp_path, capsys):
    assert main(["eval", str(run_dir)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == FILES
    page = (run_dir / "eval" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 4  # with the run's training curves

    out = tmp_path / "elsewhere"
    assert main(["eval", str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == FILES


def test_cli_eval_no_report_and_folder_data(run_dir, tmp_path):
    (run_dir / "eval.json").unlink()
    assert main(["eval", str(run_dir), "--no-report", "--out", str(tmp_path / "none")]) == 0
    assert (run_dir / "eval.json").exists() and not (tmp_path / "none").exists()

    # A folder of images: the wrong-prediction grid shows the files themselves.
    d = load_data("digits")
    for i in range(30):
        cls = tmp_path / "folder" / str(int(d.val.labels[i]))
        cls.mkdir(parents=True, exist_ok=True)
        Image.fromarray(d.val.images[i, 0].numpy(), "L").save(cls / f"{i}.png")
    for c in range(10):  # the classes must match the run's
        (tmp_path / "folder" / str(c)).mkdir(exist_ok=True)
        Image.fromarray(d.val.images[100 + c, 0].numpy(), "L").save(tmp_path / "folder" / str(c) / f"x{c}.png")
    out = tmp_path / "folder-report"
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "folder"), "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["summary"]["n"] == 40 and (out / "most_confident_wrong.png").stat().st_size > 1000
