"""Example inputs inferred from a Hugging Face transformers model's ``config`` (issue 16), beside timm's rule."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import auxwrap


def _with_config(**config: object) -> nn.Module:
    """A module that carries a transformers-like ``config`` (the attributes the rule reads, nothing else)."""
    model = nn.Conv2d(3, 4, 3)
    model.config = SimpleNamespace(**config)
    return model


@pytest.mark.parametrize(("config", "shape"), [
    ({"image_size": 32, "num_channels": 3}, (2, 3, 32, 32)),
    ({"image_size": (24, 40), "num_channels": 1}, (2, 1, 24, 40)),
    ({"image_size": [16, 8]}, (2, 3, 16, 8)),  # no num_channels: 3, as transformers' vision configs default to
])
def test_a_transformers_config_gives_the_input_size(config, shape):
    (x,) = auxwrap.default_example_inputs(_with_config(**config))
    assert x.shape == shape and x.dtype == torch.float32


def test_config_inputs_are_seeded_and_leave_the_global_random_state_alone():
    model = _with_config(image_size=8, num_channels=3)
    state = torch.get_rng_state()
    (first,), (second,) = auxwrap.default_example_inputs(model), auxwrap.default_example_inputs(model)
    assert torch.equal(state, torch.get_rng_state()) and torch.equal(first, second)
    assert torch.equal(first, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)))


def test_config_inputs_follow_the_model_dtype():
    (x,) = auxwrap.default_example_inputs(_with_config(image_size=8).to(torch.float64))
    assert x.dtype == torch.float64


def test_timm_pretrained_cfg_comes_first():
    model = _with_config(image_size=8)
    model.pretrained_cfg = {"input_size": (3, 12, 12)}
    assert auxwrap.default_example_inputs(model)[0].shape == (2, 3, 12, 12)


@pytest.mark.parametrize("config", [{"vocab_size": 100}, {"image_size": None}, {"image_size": (32,)},
                                    {"image_size": 32, "num_channels": 0}, {"image_size": "32"}])
def test_a_config_without_a_usable_image_size_names_both_sources_and_the_fix(config):
    with pytest.raises(auxwrap.AuxwrapArgumentError) as info:
        auxwrap.default_example_inputs(_with_config(**config))
    message = str(info.value)
    assert "cannot infer example inputs for Conv2d" in message
    assert "timm pretrained_cfg input_size" in message and "transformers config with image_size" in message
    assert "pass example_inputs=(torch.randn(2, 3, H, W),)" in message


def test_a_real_transformers_vit_is_captured_from_its_config_alone():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
        intermediate_size=64, num_labels=5)).eval()
    assert auxwrap.default_example_inputs(model)[0].shape == (2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capture="export": no fallback message
        traced = auxwrap.trace(model, capture="export")  # no example_inputs: the config's size
    assert traced.capture == "export"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced.graph_module(x).logits, model(x).logits)
