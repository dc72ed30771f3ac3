"""DeiT distillation: the losses by hand, the frozen teacher, per-head evaluation, and real runs."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vitkit
from vitkit.cli import main
from vitkit.data import load_data
import vitkit.run as vrun
from vitkit.engine import evaluate
from vitkit.engine.objectives.distill import DistillationLoss, Teacher, load_teacher
from vitkit.engine.runtime import Runtime

IDENTITY = ((0.0,), (1.0,))


class Fixed(torch.nn.Module):
    """A 'teacher' that returns given logits whatever the input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.logits * self.w


def _teacher(logits):
    return Teacher(Fixed(logits), name="fixed", student_norm=IDENTITY, teacher_norm=IDENTITY)


def test_hard_distillation_by_hand():
    x = torch.zeros(2, 1, 4, 4)
    cls = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    dist = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.1, 5.0, 0.2], [0.0, 0.0, 4.0]])  # argmax: 1, 2
    y = torch.tensor([0, 1])
    loss = DistillationLoss(_teacher(teacher), "hard", alpha=0.5)(x, (cls, dist), y)

    def ce(logits, t):  # -log softmax(logits)[t], averaged
        return sum(-logits[i, t[i]] + math.log(sum(math.exp(v) for v in logits[i].tolist())) for i in range(2)) / 2

    want = float(0.5 * ce(cls, [0, 1]) + 0.5 * ce(dist, [1, 2]))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_soft_distillation_by_hand():
    x = torch.zeros(1, 1, 4, 4)
    cls, dist, teacher = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    T, a = 2.0, 0.3
    loss = DistillationLoss(_teacher(teacher), "soft", alpha=a, tau=T)(x, (cls, dist), torch.tensor([0]))
    p = F.softmax(teacher / T, 1)[0]
    q = F.softmax(dist / T, 1)[0]
    kl = sum(p[i] * math.log(p[i] / q[i]) for i in range(2)).item()
    base = -math.log(math.exp(1) / (math.exp(1) + 1))
    assert loss.item() == pytest.approx((1 - a) * base + a * kl * T * T / 2, rel=1e-5)  # DeiT divides by numel


def test_no_distillation_trains_every_head_on_labels_and_label_smoothing_stays_off_the_teacher_term():
    x = torch.zeros(2, 1, 4, 4)
    cls, dist, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 2])
    none = DistillationLoss(None, "none", label_smoothing=0.1)(x, (cls, dist), y)
    assert none.item() == pytest.approx(((F.cross_entropy(cls, y, label_smoothing=0.1) + F.cross_entropy(dist, y, label_smoothing=0.1)) / 2).item())
    teacher = torch.tensor([[0.0, 0.0, 9.0], [9.0, 0.0, 0.0]])
    hard = DistillationLoss(_teacher(teacher), "hard", alpha=1.0, label_smoothing=0.1)(x, (cls, dist), y)
    assert hard.item() == pytest.approx(F.cross_entropy(dist, torch.tensor([2, 0])).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs a teacher"):
        DistillationLoss(None, "hard")


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradient():
    net = vitkit.create_model("vit_pico_conv4_28", num_classes=10, in_chans=1)
    teacher = Teacher(net, name="t", student_norm=IDENTITY, teacher_norm=IDENTITY)
    student = vitkit.create_model("deit_pico_distilled_conv4_28", num_classes=10, in_chans=1).train()
    teacher.train()
    assert not teacher.model.training and all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = DistillationLoss(teacher, "hard")(x, student(x), y)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # BatchNorm stats too


def test_teacher_sees_its_own_normalisation_and_size():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(x.shape[0], 2)

    t = Teacher(Probe(), name="p", student_norm=((0.5,), (0.25,)), teacher_norm=((0.1,), (0.5,)), img_size=(8, 8))
    raw = torch.rand(1, 1, 4, 4)
    t((raw - 0.5) / 0.25)
    want = F.interpolate((raw - 0.1) / 0.5, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    assert torch.allclose(seen["x"], want, atol=1e-5)


def test_eval_averages_the_two_heads_and_reports_each():
    model = vitkit.create_model("deit_pico_distilled_conv4_28", num_classes=4, in_chans=1).eval()
    x, y = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 0, 1])
    out = evaluate(model, [(x, y)], Runtime("cpu"), return_outputs=True)
    model.train()
    with torch.no_grad():
        model.eval()
        feats = model.forward_features(x)
        pooled = model.pool(feats)
        cls, dist = model.head(model.fc_norm(pooled[0])), model.head_dist(model.fc_norm(pooled[1]))
    assert torch.allclose(out["logits"], (cls + dist) / 2, atol=1e-6)
    want = [100 * (cls.argmax(1) == y).sum().item() / 6, 100 * (dist.argmax(1) == y).sum().item() / 6]
    assert out["acc1_heads"] == pytest.approx(want)
    assert len(model.forward_heads(x)) == 2 and len(vitkit.create_model("vit_pico_conv4_28").eval().forward_heads(torch.randn(1, 1, 28, 28))) == 1


def test_teacher_with_other_classes_or_without_weights_is_refused(tmp_path):
    d = load_data("digits")
    with pytest.raises(ValueError, match="needs --teacher-weights"):
        load_teacher("tv:resnet18", classes=d.classes, in_chans=1, img_size=(16, 16), student_norm=(d.mean, d.std))
    model = vitkit.create_model("tv:resnet18", num_classes=3, in_chans=1, img_size=16)
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(ValueError, match="do not fit|predicts 3 classes"):
        load_teacher("tv:resnet18", classes=d.classes, in_chans=1, img_size=(16, 16), student_norm=(d.mean, d.std),
                     weights=str(tmp_path / "r18.safetensors"))


def _digit_folder(root):
    d = load_data("digits")
    for c in range(4):
        (root / f"d{c}").mkdir(parents=True)
        for i, idx in enumerate((d.train.labels == c).nonzero().flatten()[:40].tolist()):
            Image.fromarray(d.train.images[idx, 0].numpy()).resize((16, 16)).save(root / f"d{c}" / f"{i}.png")
    return root


@pytest.mark.slow  # ~22 s: teacher and student from the CLI; the objective's parts are checked above
def test_deit_pipeline_from_the_cli_on_an_image_folder(tmp_path):
    """Train a CNN teacher, then a distilled DeiT student from it, both from the CLI, offline."""
    folder = _digit_folder(tmp_path / "imgs")
    common = ["--data", str(folder), "--img-size", "16", "--batch-size", "16", "--warmup-epochs", "0"]
    assert main(["train", "--model", "tv:resnet18", *common, "--epochs", "3", "--out", str(tmp_path / "teacher")]) == 0
    teacher_acc = vrun.read_metrics(tmp_path / "teacher")[-1]["val_acc1_ema"]
    assert main(["train", "--model", "deit_pico_distilled_conv4_28", *common, "--epochs", "4", "--teacher",
                 str(tmp_path / "teacher"), "--out", str(tmp_path / "student")]) == 0
    rec = vrun.RunRecord.read(tmp_path / "student")
    d = rec.settings["distill"]
    assert rec.objective == "distill" and d["teacher"] == str(tmp_path / "teacher") and d["kind"] == "hard" and d["alpha"] == 0.5
    rows = vrun.read_metrics(tmp_path / "student")
    assert {"val_acc1_cls", "val_acc1_dist"} <= set(rows[-1])
    assert teacher_acc > 40 and rows[-1]["val_acc1"] > rows[0]["val_acc1"] - 1e-9 and rows[-1]["val_acc1"] > 40
