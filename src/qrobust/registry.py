"""Registries of named components, so configs and the CLI name them by string.

Idea from timm's ``@register_model``: ``MODELS.register("convnet")(build_convnet)`` and
``MODELS.get("convnet")``. An unknown name raises a :class:`ConfigError` that lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qrobust.errors import ConfigError


class Registry:
    """A name -> object mapping for one kind of component (models, datasets, attacks, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def add(obj: Any) -> Any:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


MODELS = Registry("model")
DATASETS = Registry("dataset")
ATTACKS = Registry("attack")
DEFENSES = Registry("defense")
OBJECTIVES = Registry("objective")
