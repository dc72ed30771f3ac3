"""The CPU fast paths: oneDNN linear layers (layers.linear) and the allocator setting (runtime)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitkit
from vitkit.models.layers import Linear, Mlp, cpu_linear_backend, set_cpu_linear
from vitkit.models.layers.linear import _onednn_works, use_onednn

needs_onednn = pytest.mark.skipif(not _onednn_works(), reason="this torch build has no oneDNN linear op")


@pytest.fixture
def backend():
    """Run a test under a chosen backend and restore the process's choice afterwards."""
    previous = set_cpu_linear("auto")
    yield set_cpu_linear
    set_cpu_linear(previous)


def _pair(bias: bool = True) -> tuple[nn.Linear, Linear]:
    torch.manual_seed(0)
    ref = nn.Linear(48, 80, bias=bias)
    ours = Linear(48, 80, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_nn_linear_forward_and_backward(backend, bias):
    backend("onednn")
    ref, ours = _pair(bias)
    x = torch.randn(3, 7, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    assert use_onednn(x, ours.weight)
    y_ref, y = ref(x), ours(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_onednn_linear_frozen_layer_passes_input_gradient(backend):
    """A frozen layer (fine-tuning a head on a fixed backbone) still passes gradients back."""
    backend("onednn")
    ref, ours = _pair()
    for p in ours.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, 48, requires_grad=True)
    ours(x).sum().backward()
    torch.testing.assert_close(x.grad, ref.weight.sum(0).expand(4, -1), atol=1e-5, rtol=1e-5)
    assert ours.weight.grad is None


@needs_onednn
def test_fused_gelu_matches_two_steps_and_respects_hooks(backend):
    torch.manual_seed(0)
    mlp = Mlp(32, 128).eval()
    x = torch.randn(2, 9, 32)
    backend("torch")
    with torch.no_grad():
        ref = mlp.fc2(F.gelu(mlp.fc1(x)))
    backend("onednn")
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)
    seen = []
    handle = mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), ref, atol=1e-5, rtol=1e-5)
    handle.remove()
    assert seen == [torch.Size([2, 9, 128])]  # the hook saw fc1's output: no fusion around it


@needs_onednn
def test_whole_model_training_step_matches_torch_backend(backend):
    torch.manual_seed(0)
    model = vitkit.create_model("vit_pico_patch4_28", num_classes=10)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    grads = {}
    for choice in ("torch", "onednn"):
        backend(choice)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        grads[choice] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["onednn"], grads["torch"], atol=1e-5, rtol=1e-4)


@needs_onednn
def test_autocast_traced_and_exported_models_use_standard_linear(backend):
    backend("onednn")
    ref, ours = _pair()
    x = torch.randn(4, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not use_onednn(x, ours.weight)
        assert torch.equal(ours(x), ref(x))
    traced = torch.jit.trace(ours.eval(), x)
    assert "_linear_pointwise" not in str(traced.inlined_graph)
    exported = torch.export.export(Mlp(48, 96).eval(), (torch.randn(2, 5, 48),))
    assert "_linear_pointwise" not in str(exported.graph)


def test_backend_choice_is_validated():
    with pytest.raises(ValueError, match="auto, onednn, torch"):
        set_cpu_linear("mkl")
    assert cpu_linear_backend() in ("onednn", "torch")


_FAULTS = textwrap.dedent("""
    import resource, torch
    from vitkit.engine.runtime import Runtime, keep_freed_memory
    Runtime("cpu")
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB, freed at once
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(keep_freed_memory(), min(faults[1:]))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_cpu_runtime_keeps_freed_memory_for_reuse(monkeypatch):
    """A 64 MB tensor is 16,384 fresh pages with glibc's defaults; with the setting, it reuses freed ones."""
    counts = {}
    for setting in ("keep", "system"):
        monkeypatch.setenv("VITKIT_CPU_ALLOCATOR", setting)
        out = subprocess.run([sys.executable, "-c", _FAULTS], capture_output=True, text=True, check=True).stdout.split()
        counts[setting] = (out[0] == "True", int(out[1]))
    assert counts["keep"][0] and not counts["system"][0]
    assert counts["system"][1] > 10_000  # every allocation page-faulted anew
    assert counts["keep"][1] < 1_000


def test_bad_allocator_setting_is_named(monkeypatch):
    from vitkit.engine.runtime import keep_freed_memory

    monkeypatch.setenv("VITKIT_CPU_ALLOCATOR", "jemalloc")
    with pytest.raises(ValueError, match="keep or system"):
        keep_freed_memory()
