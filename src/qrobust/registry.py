"""Registries of named components, so configs and the CLI name them by string.

Idea from timm's ``@register_model``: ``MODELS.register("convnet")(build_convnet)`` and
``MODELS.get("convnet")``. An unknown name raises a :class:`ConfigError` that lists the valid ones.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from qrobust.errors import ConfigError

# Modules whose components register themselves on import. They are imported on the first lookup, not
# when qrobust is imported (no import-time side effects, no import cycles).
BUILTIN_MODULES = (
    "qrobust.models",
    "qrobust.data",
    "qrobust.train.objectives",
    "qrobust.train.sq_objective",
    "qrobust.attacks.whitebox",
    "qrobust.attacks.blackbox",
    "qrobust.attacks.adaptive",
    "qrobust.attacks.patch",
    "qrobust.attacks.extraction.knockoff",
    "qrobust.attacks.extraction.dfme",
    "qrobust.attacks.extraction.maze",
    "qrobust.defenses.output",
    "qrobust.defenses.detection",
)
OPTIONAL_MODULES = ("qrobust.train.divqat", "qrobust.defenses.patch_training")
_loaded = False


def load_builtin_components() -> None:
    """Import every built-in component module once so that all registries are complete."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN_MODULES:
        importlib.import_module(name)
    for name in OPTIONAL_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


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
        if name not in self._items:
            load_builtin_components()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} '{name}'; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        load_builtin_components()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        load_builtin_components()
        return name in self._items


MODELS = Registry("model")
DATASETS = Registry("dataset")
EVASION = Registry("evasion attack")  # one call shape: qrobust.attacks.evasion
ATTACKS = Registry("attack")
EXTRACTION = Registry("extraction attack")  # classes with a config_class: qrobust.attacks.extraction.base
DEFENSES = Registry("defense")
OBJECTIVES = Registry("objective")
PATCH_ATTACKS = Registry("patch attack")  # classes with a config_class: qrobust.attacks.patch.PatchAttack
