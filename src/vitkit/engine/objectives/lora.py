"""LoRA fine-tuning (Hu et al. 2022) through Hugging Face PEFT: low-rank adapters `W + (alpha / r) B A` on
the named linear layers of a frozen backbone; the new classifier trains in full.

The adapters live in the model while it trains (PEFT's `inject_adapter_in_model`, so the backbone keeps
its class and the model contract); what a run saves is the merged, plain state dict, so eval, explain,
export and serve load it like any other run. The adapter alone is saved beside it in PEFT's format.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...run import atomic_write, save_weights

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("--finetune lora needs Hugging Face PEFT: pip install peft (or vitkit[finetune])") from None
    return peft


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> dict[str, Any]:
    """Adapters on the linears whose names end with one of `targets` (`qkv`, `proj`, `fc1`, ...; `qkv` means
    `q_proj`, `k_proj`, `v_proj` where a model has those instead); every other weight frozen but the classifier(s). Returns the adapter's PEFT config (JSON-ready)."""
    peft = _peft()
    names = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    if "qkv" in targets and "qkv" not in names and "q_proj" in names:  # EVA-02 B/L keep the three apart
        targets = [u for t in targets for u in (("q_proj", "k_proj", "v_proj") if t == "qkv" else (t,))]
    if missing := [t for t in targets if t not in names]:
        raise ValueError(f"--lora_targets {', '.join(missing)}: no linear layer of that name; this model has "
                         f"{', '.join(names)}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets))
    peft.inject_adapter_in_model(config, model)
    heads = tuple(model.head_prefixes)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith(heads))
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()
            if isinstance(v, (str, int, float, bool, list, set, type(None)))}


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every adapter folded into its base weight, under the plain model's names."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            base = state.pop(f"{name}.base_layer.weight")
            state[f"{name}.weight"] = base + m.get_delta_weight("default").to(base.dtype)
            if f"{name}.base_layer.bias" in state:
                state[f"{name}.bias"] = state.pop(f"{name}.base_layer.bias")
    return {k: v for k, v in state.items() if "lora_" not in k}


def save_adapter(model: nn.Module, config: dict[str, Any], run_dir: Path) -> None:
    """The adapter alone, as PEFT saves one (`adapter_model.safetensors`, `adapter_config.json`), and the classifier."""
    peft = _peft()
    state = peft.get_peft_model_state_dict(model)
    heads = tuple(model.head_prefixes)
    state.update({k: v for k, v in model.state_dict().items() if k.startswith(heads)})
    save_weights(run_dir / ADAPTER_WEIGHTS, {k: v.contiguous() for k, v in state.items()})
    atomic_write(run_dir / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
