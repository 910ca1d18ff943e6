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
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return (torch.randn(EXAMPLE_BATCH, *size, generator=generator).to(device),)
