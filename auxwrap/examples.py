"""Example inputs: what a model is called with while auxwrap learns its shapes."""

from __future__ import annotations

import torch
from torch import nn

from .errors import AuxwrapArgumentError

#: batch size of inferred example inputs (2, so that BatchNorm in train mode can run on them)
EXAMPLE_BATCH = 2


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """A seeded random batch of the model's own input size; an error for models that do not state one.

    The size comes from timm's ``pretrained_cfg["input_size"]`` or, for a Hugging Face transformers vision
    model, from its ``config`` (``image_size``: an int or a (height, width) pair; ``num_channels``, default 3).
    The global random state is left untouched.
    """
    size = _timm_input_size(model) or _config_input_size(model)
    if size is None:
        raise AuxwrapArgumentError(
            f"cannot infer example inputs for {type(model).__name__} (it has neither a timm pretrained_cfg "
            "input_size nor a transformers config with image_size); pass example_inputs=(torch.randn(2, 3, H, W),) "
            "with the shape its forward() takes.")
    generator = torch.Generator().manual_seed(0)
    device, dtype = device_and_dtype(model)
    return (torch.randn(EXAMPLE_BATCH, *size, generator=generator).to(device=device, dtype=dtype),)


def _timm_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from timm's ``pretrained_cfg`` (or the older ``default_cfg``), if the model has one."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return tuple(size) if isinstance(size, (tuple, list)) and len(size) == 3 else None


def _config_input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """(C, H, W) from a transformers ``config``: ``num_channels`` (3 if absent) and ``image_size``."""
    config = getattr(model, "config", None)
    image_size = getattr(config, "image_size", None)
    channels = getattr(config, "num_channels", 3)
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not (isinstance(image_size, (tuple, list)) and len(image_size) == 2 and isinstance(channels, int)
            and all(isinstance(n, int) and n > 0 for n in (channels, *image_size))):
        return None
    return (channels, *image_size)


def as_input_tuple(example_inputs: object, model_name: str, why: str = "") -> tuple:
    """Normalise ``example_inputs`` (a tensor or a tuple of positional inputs) to a tuple; ``why`` says, in the
    error, what they are for."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise AuxwrapArgumentError(
        f"example_inputs for {model_name} must be a tensor or a non-empty tuple of the positional "
        f"inputs of forward(), got {type(example_inputs).__name__}{f'; {why}' if why else ''}; "
        "e.g. example_inputs=(torch.randn(2, 3, 64, 64),)")


def device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a model computes and in which float type: those of its first floating-point parameter
    (CPU, float32 for a model without one). Inputs, fusion modules and branches must match it."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
