"""Explain a classifier's decisions: attention maps, attention rollout and Grad-CAM, for every family.

    maps = vitkit.explain.rollout(model, images)          # (B, H, W) in [0, 1]
    maps = vitkit.explain.attention_map(model, images, per_head=True)
    maps = vitkit.explain.gradcam(model, images, target=3)

Maps come through the model contract's explicit attention path, never from hooks (docs/evaluate_explain.md).
"""

from .maps import METHODS, attention_map, capture, explain, gradcam, head_query, rollout
from .overlay import explain_files, overlay
from .rollout import HEAD_FUSIONS, discard_lowest, fuse_heads, hierarchical_rollout, rollout_matrices

__all__ = ["HEAD_FUSIONS", "METHODS", "attention_map", "capture", "discard_lowest", "explain", "explain_files",
           "fuse_heads", "gradcam", "head_query", "hierarchical_rollout", "overlay", "rollout", "rollout_matrices"]
