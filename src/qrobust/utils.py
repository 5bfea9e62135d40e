"""Small helpers shared by the library: leave the caller's modules as they were found.

The project rule (docs/ARCHITECTURE.md, "Conventions"): a function that needs a model in eval mode for
its own forwards switches it only for those forwards and gives every submodule its own train/eval flag
back afterwards, so a mixed-mode model (e.g. a frozen BatchNorm inside a training model) comes back
mixed. ``model.train(was_training)`` would not: it sets one flag on every submodule.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode inside the ``with`` block; restore each submodule's flag on exit.

    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> net[1].eval()  # mixed mode
    BatchNorm1d(2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
    >>> with eval_mode(net):
    ...     net.training, net[0].training
    (False, False)
    >>> net.training, net[0].training, net[1].training
    (True, True, False)
    """
    saved: dict[int, tuple[nn.Module, bool]] = {}
    for model in models:
        for module in model.modules():
            saved.setdefault(id(module), (module, module.training))
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, flag in saved.values():
            module.train(flag)


def module_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a module without either."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


__all__ = ["eval_mode", "module_device"]
