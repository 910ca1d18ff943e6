"""Tiny random-init Hugging Face transformers vision models for the torch.export capture tests: torch.fx cannot
trace any of them (Python control flow in their forwards), non-strict torch.export can.

Each builder takes the input size and a dropout probability (0: dropout and drop-path off, so that train-mode
outputs are deterministic). Entries name the fusion points the tests give attach() for the model: ``None`` for
the default ``taps="layer"``, else module paths (where the default finds none, or only in the decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from torch import nn


def _transformers() -> ModuleType:
    """transformers, or a skip of the test that needs it (the other tests of a file importing this one run)."""
    return pytest.importorskip("transformers")


def vit(size: int, dropout: float = 0.0) -> nn.Module:
    """ViT classifier: 2 blocks of width 32, 8x8 patches (tokens, with a class token)."""
    transformers = _transformers()
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=size, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=5, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


def convnext(size: int, dropout: float = 0.0) -> nn.Module:
    """ConvNeXt classifier: 2 stages of one block (NCHW maps; layer scale, channels-last LayerNorm inside)."""
    del size  # any input size
    transformers = _transformers()
    return transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=5, drop_path_rate=dropout))


def swin(size: int, dropout: float = 0.0) -> nn.Module:
    """Swin classifier: 2 stages of one block, windows of 4 tokens (tokens, patch merging between stages)."""
    transformers = _transformers()
    return transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=size, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, drop_path_rate=dropout))


def segformer(size: int, dropout: float = 0.0) -> nn.Module:
    """SegFormer segmenter (dense output at 1/4 resolution): 2 encoder stages, an all-MLP decoder with a
    BatchNorm (folded when deployed)."""
    del size  # any input size
    transformers = _transformers()
    return transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=3,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, classifier_dropout_prob=dropout,
        drop_path_rate=dropout))


#: name -> (builder, fusion points for attach(): None for the default, else module paths)
HF: dict[str, tuple[Callable[..., nn.Module], tuple[str, ...] | None]] = {
    "hf_vit": (vit, None),
    "hf_convnext": (convnext, None),
    # the default finds no point in a Swin stage (its blocks pass on several tensors) ...
    "hf_swin": (swin, ("swin.encoder.layers.0.blocks.0", "swin.encoder.layers.1.blocks.0")),
    # ... and in SegFormer only the decoder's last activation: its two encoder stages are named instead
    "hf_segformer": (segformer, ("segformer.stages.0", "segformer.stages.1")),
}


def make_hf(name: str, size: int = 32, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    """A fresh model of HF with seeded weights, for ``(B, 3, size, size)`` inputs, in train mode."""
    torch.manual_seed(seed)
    return HF[name][0](size, dropout).train()


def hf_taps(name: str) -> list[str] | str:
    """What to pass as the model's ``taps`` to attach()."""
    taps = HF[name][1]
    return "layer" if taps is None else list(taps)
