"""The study's attacks, by name: each makes adversarial versions of the test images for one model and
budget. To add one: write ``_run_<name>(target, eps) -> x_adv`` and add ``name: Attack(run, label)`` to
:data:`ATTACKS` (plus a switch in ``config.ATTACK_SWITCHES`` if a setting can turn it off); every model's
evaluation, the tables and the figures pick it up from there."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qrobust.attacks.blackbox import square_attack
from qrobust.attacks.whitebox import GradientMaskingWarning, apgd_ce, fgsm, pgd
from qrobust.quant.sq_model import float_twin
from qrobust.studies.sq.config import AttackCfg


@dataclass
class Deployed:
    """A trained model as the attacker meets it: ``net`` (deployed: for an SQ model its N-draw
    :class:`~qrobust.quant.stochastic.EnsembleSQ`), ``raw`` (the SQ network itself) if randomised."""

    net: nn.Module
    raw: nn.Module | None = None

    @property
    def randomised(self) -> bool:
        return self.raw is not None


@dataclass
class Target:
    """What an attack needs: the model, the attack settings, the test images, the study seed (random
    starts) and the float model (the transfer attack's source)."""

    model: Deployed
    settings: AttackCfg
    x: Tensor
    y: Tensor
    seed: int
    float_net: nn.Module

    def generator(self) -> torch.Generator:
        """The random starts' generator: the same stream for every attack, model and budget of a seed."""
        return torch.Generator(device=self.x.device).manual_seed(self.seed * 1000 + 17)

    def batched(self, fn: Callable[..., Tensor], **kwargs) -> Tensor:
        """``fn(x_b, y_b, check=<first batch only>, **kwargs)`` over batches of ``settings.batch_size``."""
        x, y, size = self.x, self.y, self.settings.batch_size
        return torch.cat([fn(x[s : s + size], y[s : s + size], check=i == 0, **kwargs)
                          for i, s in enumerate(range(0, len(y), size))])


def _gradient(t: Target, eps: float, fn: Callable[..., Tensor], eot: int, **kwargs) -> Tensor:
    """A gradient attack on the deployed model (``eot`` draws per gradient). A single-gradient attack
    on a randomised model is intended here (EOT-PGD is its own entry), so its warning is silenced."""
    net, norm = t.model.net, t.settings.norm
    with warnings.catch_warnings():
        if t.model.randomised and eot == 1:
            warnings.simplefilter("ignore", GradientMaskingWarning)
        return t.batched(lambda xb, yb, **k: fn(net, xb, yb, eps, norm=norm, eot=eot, **k), **kwargs)


def _run_fgsm(t: Target, eps: float) -> Tensor:
    return _gradient(t, eps, fgsm, 1)


def _run_pgd(t: Target, eps: float) -> Tensor:
    """PGD with one gradient of the deployed model (for an SQ model: of its N-draw ensemble) per step."""
    return _gradient(t, eps, pgd, 1, steps=t.settings.steps, generator=t.generator())


def _run_eot_pgd(t: Target, eps: float) -> Tensor:
    """PGD with the gradient averaged over ``attack.eot`` draws of the deployed model per step."""
    return _gradient(t, eps, pgd, t.settings.eot, steps=t.settings.steps, generator=t.generator())


def _run_apgd_ce(t: Target, eps: float) -> Tensor:
    """APGD-CE, one gradient of the deployed model per step, as PGD (see docs/CHOICES.md)."""
    return _gradient(t, eps, apgd_ce, 1, steps=t.settings.apgd_steps, generator=t.generator())


def _run_transfer(t: Target, eps: float) -> Tensor:
    """PGD made on the float model (a black-box check), the same examples for every target. Made
    under ``fork_rng``: the global RNG (the target's SQ noise) is left as it was."""
    fp, a = t.float_net, t.settings
    with torch.random.fork_rng(devices=[]):
        return t.batched(lambda xb, yb, **k: pgd(fp, xb, yb, eps, norm=a.norm, **k), steps=a.steps,
                         generator=t.generator())


def _run_bpda(t: Target, eps: float) -> Tensor:
    """BPDA: PGD on the model's float twin (quantizers off, SQs as the identity)."""
    twin, a = float_twin(t.model.raw if t.model.randomised else t.model.net), t.settings
    return t.batched(lambda xb, yb, **k: pgd(twin, xb, yb, eps, norm=a.norm, **k), steps=a.steps,
                     generator=t.generator())


def _run_square(t: Target, eps: float) -> Tensor:
    """Square Attack on the deployed model's outputs; paired (common random numbers) on SQ models."""
    net, a = t.model.net, t.settings
    return t.batched(lambda xb, yb, check, **k: square_attack(net, xb, yb, eps, queries=a.square_queries,
                                                              p_init=a.square_p_init,
                                                              common_noise=t.model.randomised, **k),
                     generator=t.generator())


@dataclass(frozen=True)
class Attack:
    run: Callable[[Target, float], Tensor]
    label: str  # its name in tables and figures


ATTACKS: dict[str, Attack] = {
    "fgsm": Attack(_run_fgsm, "FGSM"),
    "pgd": Attack(_run_pgd, "PGD"),
    "eot-pgd": Attack(_run_eot_pgd, "EOT-PGD"),
    "apgd-ce": Attack(_run_apgd_ce, "APGD-CE"),
    "transfer": Attack(_run_transfer, "transfer (PGD on float)"),
    "bpda": Attack(_run_bpda, "BPDA (PGD on the float twin)"),
    "square": Attack(_run_square, "Square (black-box)"),
}
ATTACK_LABELS = {name: attack.label for name, attack in ATTACKS.items()}
STRENGTH_CHECKS = ("apgd-ce", "bpda", "square")  # attacks that reveal where fixed-step PGD overstates robustness
ABLATION_ATTACKS = ("pgd", "eot-pgd", *STRENGTH_CHECKS)  # what every ablation variant is attacked with


def run_attack(name: str, target: Target, eps: float) -> Tensor:
    """Adversarial test images of attack ``name`` against ``target`` at budget ``eps``."""
    return ATTACKS[name].run(target, eps)
