import pytest
import torch

import vitkit


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
