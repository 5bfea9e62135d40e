"""One protocol for the extraction family, its config objects and its registry.

Every extraction attack is a class registered in :data:`qrobust.registry.EXTRACTION` under its name,
with a validated config dataclass (``config_class``) that lists each setting once, and is used the same
way::

    attack = DFME(victim, clone, DFMEConfig(batch_size=128), seed=0)      # config, then overrides
    attack = make_extraction_attack("dfme", victim, clone, batch_size=128, seed=0)   # by name
    result = attack.run(num_queries=100_000, eval_data=(x_test, y_test), eval_every=10)

* ``Attack(victim, clone, config=None, **overrides)``: ``config`` is the attack's config object, a
  mapping of its settings, or None (the defaults); ``overrides`` replace single settings. Inputs that
  are data rather than settings (KnockoffNets' transfer set, a DFME generator module) are keyword
  arguments named in the class's ``inputs``.
* ``attack.run(num_queries=None, eval_data=None, eval_every=None) -> ExtractionResult``: spend at most
  ``num_queries`` (default: what the victim has left), record clone accuracy on ``eval_data`` at the
  start, every ``eval_every`` iterations and at the end (KnockoffNets: every ``eval_every`` epochs of
  its fit), and return the result record.

An unknown setting is a :class:`ConfigError` that names the valid ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from torch import Tensor, nn

from qrobust.attacks.extraction.metrics import ExtractionResult
from qrobust.attacks.extraction.victim import Victim
from qrobust.checks import check_bool, check_int
from qrobust.errors import ConfigError
from qrobust.registry import EXTRACTION

C = TypeVar("C", bound="ExtractionConfig")


@dataclass
class ExtractionConfig:
    """Settings every extraction attack has."""

    progress: bool = False  # tqdm progress bars
    seed: int | None = None  # seed of the attack's own random draws (z, directions, sampling); None = drawn

    def __post_init__(self) -> None:
        check_bool("progress", self.progress)
        if self.seed is not None:
            check_int("seed", self.seed, 0)

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls: type[C], config: C | Mapping[str, Any] | None = None, **overrides: Any) -> C:
        """``config`` (an instance, a mapping of settings or None) with ``overrides`` applied, validated."""
        if config is None:
            settings: dict[str, Any] = {}
        elif isinstance(config, cls):
            settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        elif isinstance(config, Mapping):
            settings = dict(config)
        else:
            raise ConfigError(
                f"config must be a {cls.__name__}, a mapping of its settings or None, got {type(config).__name__}"
            )
        settings.update(overrides)
        unknown = sorted(set(settings) - set(cls.setting_names()))
        if unknown:
            raise ConfigError(
                f"{cls.__name__} has no setting {', '.join(unknown)}; its settings: {', '.join(cls.setting_names())}"
            )
        return cls(**settings)


@runtime_checkable
class ExtractionAttack(Protocol):
    """What every registered extraction attack provides."""

    name: str
    victim: Victim
    clone: nn.Module
    config: ExtractionConfig

    def run(
        self,
        num_queries: int | None = None,
        eval_data: tuple[Tensor, Tensor] | None = None,
        eval_every: int | None = None,
    ) -> ExtractionResult: ...


def register_extraction(name: str):
    """Class decorator: register an extraction attack (with ``config_class`` and ``inputs``) under ``name``."""

    def add(cls: type) -> type:
        if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
            raise TypeError(f"{cls.__name__} needs a config_class dataclass to be registered")
        return EXTRACTION.register(name)(cls)

    return add


def make_extraction_attack(name: str, victim: Victim, clone: nn.Module, **settings: Any) -> ExtractionAttack:
    """Build the extraction attack registered under ``name`` from keyword settings.

    ``settings`` are the attack's config settings plus its inputs (``cls.inputs``, e.g. ``transfer_set``);
    anything else is a :class:`ConfigError` naming the valid ones.
    """
    cls = EXTRACTION.get(name)
    inputs = {key: settings.pop(key) for key in list(settings) if key in cls.inputs}
    valid = cls.config_class.setting_names()
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        accepted = ", ".join([*valid, *cls.inputs])
        raise ConfigError(f"extraction attack '{name}' has no setting {', '.join(unknown)}; it takes: {accepted}")
    return cls(victim, clone, cls.config_class.build(None, **settings), **inputs)


def extraction_attack_names() -> list[str]:
    return EXTRACTION.names()


__all__ = [
    "ExtractionAttack",
    "ExtractionConfig",
    "extraction_attack_names",
    "make_extraction_attack",
    "register_extraction",
]
