"""One protocol for the evasion family (white-box and score-based attacks on single inputs) and its registry.

Every evasion attack is a function registered in :data:`qrobust.registry.EVASION` under its name and
called the same way::

    x_adv = attack(model, x, y, eps=0.05, norm="linf", generator=g, **settings)

* ``model``: the attacked classifier (inputs in [0, 1], logits out); ``x`` a float batch in [0, 1],
  ``y`` one integer label per input;
* ``eps``: the budget (a number, ``"8/255"`` or a budget name ``"linf:8/255"``); ``norm``: ``"linf"``
  or ``"l2"`` (an attack that implements one norm only says so with a :class:`ConfigError`);
* ``generator``: the attack's own random draws (random starts, Square's windows); the model's own
  randomness (stochastic quantizers) uses the global RNG. An attack without random draws accepts it
  and ignores it;
* ``settings``: the attack's own keyword settings (``steps``, ``eot``, ``queries``, ...). EOT
  (Athalye et al. 2018) is a setting (``eot=n``) of every gradient attack, not a separate attack.

The result is ``x_adv``: detached, in [0, 1], within ``eps`` of ``x``. Names and settings come from
configs: :func:`make_evasion_attack` binds a name and its settings into such a function, and an unknown
name or setting is a :class:`ConfigError` that lists the valid ones (:func:`evasion_settings`).

Registered: ``fgsm``, ``pgd``, ``apgd-ce``, ``bpda`` (:mod:`qrobust.attacks.whitebox`), ``square``
(:mod:`qrobust.attacks.blackbox`), ``mi-adaptive-pgd`` (:mod:`qrobust.attacks.adaptive`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor

from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS, EVASION

__all__ = ["PROTOCOL", "evasion_attack_names", "evasion_settings", "make_evasion_attack", "register_evasion"]

# What every evasion attack takes besides its own settings.
PROTOCOL = ("model", "x", "y", "eps", "norm", "generator")


def register_evasion(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Function decorator: register an evasion attack under ``name`` in :data:`EVASION` (and in the
    general :data:`ATTACKS` index). Its signature must take every :data:`PROTOCOL` argument."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        missing = [p for p in PROTOCOL if p not in inspect.signature(fn).parameters]
        if missing:
            raise TypeError(f"evasion attack {name!r} ({fn.__name__}) lacks protocol argument(s) {missing}")
        EVASION.register(name)(fn)
        return ATTACKS.register(name)(fn)

    return add


def evasion_attack_names() -> list[str]:
    return EVASION.names()


def evasion_settings(name: str) -> list[str]:
    """The keyword settings of evasion attack ``name`` beyond the protocol (``eps``, ``norm``, ...)."""
    params = inspect.signature(EVASION.get(name)).parameters
    return [p for p in params if p not in PROTOCOL]


def make_evasion_attack(name: str, **settings: Any) -> Callable[..., Tensor]:
    """Evasion attack ``name`` with ``settings`` bound: ``attack(model, x, y, eps=..., norm=..., generator=...)``.

    ``settings`` may also hold ``norm`` (a default the call can override). An unknown name or setting
    is a :class:`ConfigError` naming the valid ones.
    """
    fn = EVASION.get(name)
    valid = evasion_settings(name)
    unknown = sorted(set(settings) - set(valid) - {"norm"})
    if unknown:
        raise ConfigError(f"evasion attack '{name}' has no setting {', '.join(unknown)}; "
                          f"its settings: {', '.join(['norm', *valid])}")
    return functools.partial(fn, **settings)
