import os
import tempfile

import pytest
import torch

import vitkit

# Folder listings are cached (`data.listing`): the tests' go to a fresh place, never the user's cache.
os.environ.setdefault("VITKIT_CACHE", tempfile.mkdtemp(prefix="vitkit-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits16_run(tmp_path_factory):
    """vit_pico_conv4_28 trained on digits at 16 px for 6 epochs (~94% top-1, ~10 s on one core),
    trained once per test session and shared by test_export, test_serve and test_web_page."""
    out = tmp_path_factory.mktemp("digits16") / "run"
    vitkit.train(vitkit.TrainConfig(data="digits", img_size=16, epochs=6, batch_size=64, num_workers=0, out=str(out)))
    return out


def perturb(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """Seeded random weights everywhere (zero biases and unit norms would hide a wrong load), in eval mode.
    Shared by the weight-loading tests: `from conftest import perturb`."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.add_(torch.rand_like(b))
            elif name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
    return model.eval()


def train_interrupted_after_first_epoch(monkeypatch, cfg) -> None:
    """`train(cfg)`, stopped (KeyboardInterrupt) right after its first epoch's checkpoint is on disk: what a
    resume test resumes. Shared by the resume tests: `from conftest import train_interrupted_after_first_epoch`."""
    import vitkit.engine.loop as engine_loop

    real_plot = engine_loop.plot_curves

    def crash(run_dir, rows):
        real_plot(run_dir, rows)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(engine_loop, "plot_curves", crash)
        with pytest.raises(KeyboardInterrupt):
            vitkit.train(cfg)
