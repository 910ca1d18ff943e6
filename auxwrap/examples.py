"""Example inputs: what a model is called with while auxwrap learns its shapes."""

from __future__ import annotations

import torch
from torch import nn

from .errors import AuxwrapArgumentError

#: batch size of inferred example inputs (2, so that BatchNorm in train mode can run on them)
EXAMPLE_BATCH = 2


def default_example_inputs(model: nn.Module) -> tuple[torch.Tensor]:
    """A seeded random batch of timm's default input size; an error for models without one.

    The global random state is left untouched.
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not (isinstance(size, (tuple, list)) and len(size) == 3):
        raise AuxwrapArgumentError(
            f"cannot infer example inputs for {type(model).__name__} (it has no timm pretrained_cfg "
            "input_size); pass example_inputs=(torch.randn(2, 3, H, W),) with the shape its forward() takes.")
    generator = torch.Generator().manual_seed(0)
    device, dtype = device_and_dtype(model)
    return (torch.randn(EXAMPLE_BATCH, *size, generator=generator).to(device=device, dtype=dtype),)


def device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where a model computes and in which float type: those of its first floating-point parameter
    (CPU, float32 for a model without one). Inputs, fusion modules and branches must match it."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
