"""The study's attacks, by name: each is an evasion attack of the registry (:mod:`qrobust.attacks.evasion`)
with settings taken from the study's ``[attack]`` section, and the model it is made on. To add one: add
``name: StudyAttack(registry name, label, settings)`` to :data:`ATTACKS` (plus a switch in
``config.ATTACK_SWITCHES`` if a setting can turn it off); every model's evaluation, the tables and the
figures pick it up from there. A setting the registered attack does not take is a ConfigError."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qrobust.attacks.evasion import make_evasion_attack
from qrobust.attacks.whitebox import GradientMaskingWarning
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


@dataclass(frozen=True)
class StudyAttack:
    """One attack of the study: ``attack`` (a name in ``EVASION``), its table ``label``, its ``settings``
    from the study's ``[attack]`` section, and what it is made on: ``"deployed"`` (the deployed model,
    for an SQ model its N-draw ensemble), ``"network"`` (the network with its quantizers: BPDA builds
    its float twin from it) or ``"float"`` (the float model: a transfer attack). ``settings(cfg,
    randomised)`` gets the ``[attack]`` section and whether the target is randomised. A single-gradient
    attack (no ``eot`` setting) on a randomised model is intended here, so its warning is silenced."""

    attack: str
    label: str
    settings: Callable[[AttackCfg, bool], dict] = field(default=lambda a, randomised: {})
    on: str = "deployed"


ATTACKS: dict[str, StudyAttack] = {
    "fgsm": StudyAttack("fgsm", "FGSM"),
    # PGD with one gradient of the deployed model (for an SQ model: of its N-draw ensemble) per step
    "pgd": StudyAttack("pgd", "PGD", lambda a, r: {"steps": a.steps}),
    # the same with the gradient averaged over ``attack.eot`` draws of the deployed model per step
    "eot-pgd": StudyAttack("pgd", "EOT-PGD", lambda a, r: {"steps": a.steps, "eot": a.eot}),
    # one gradient of the deployed model per step, as PGD (see docs/CHOICES.md); on a randomised model a
    # point counts as fooling only if attack.draws evaluations all misclassify it
    "apgd-ce": StudyAttack("apgd-ce", "APGD-CE", lambda a, r: {"steps": a.apgd_steps,
                                                              "fooled_draws": a.draws if r else 1}),
    # PGD made on the float model (a black-box check), the same examples for every target
    "transfer": StudyAttack("pgd", "transfer (PGD on float)", lambda a, r: {"steps": a.steps}, on="float"),
    # BPDA: PGD on the model's float twin (quantizers off, SQs as the identity)
    "bpda": StudyAttack("bpda", "BPDA (PGD on the float twin)", lambda a, r: {"steps": a.steps}, on="network"),
    # Square Attack on the deployed model's outputs; paired (common random numbers) on SQ models
    "square": StudyAttack("square", "Square (black-box)", lambda a, r: {"queries": a.square_queries,
                                                                      "p_init": a.square_p_init,
                                                                      "common_noise": r}),
}
ATTACK_LABELS = {name: attack.label for name, attack in ATTACKS.items()}
STRENGTH_CHECKS = ("apgd-ce", "bpda", "square")  # attacks that reveal where fixed-step PGD overstates robustness
ABLATION_ATTACKS = ("pgd", "eot-pgd", *STRENGTH_CHECKS)  # what every ablation variant is attacked with


def run_attack(name: str, target: Target, eps: float) -> Tensor:
    """Adversarial test images of attack ``name`` against ``target`` at budget ``eps``, in batches of
    ``attack.batch_size`` (the set-up checks on the first batch only), the random starts from
    :meth:`Target.generator`. A transfer attack runs under ``fork_rng``: the global RNG (the target's
    SQ noise) is left as it was."""
    spec, a, model = ATTACKS[name], target.settings, target.model
    settings = spec.settings(a, model.randomised)
    attack = make_evasion_attack(spec.attack, norm=a.norm, **settings)
    net = {"deployed": model.net, "network": model.raw if model.randomised else model.net,
           "float": target.float_net}[spec.on]
    checks = spec.attack != "square"  # Square has no set-up checks
    x, y, size, gen = target.x, target.y, a.batch_size, target.generator()

    def batches() -> Tensor:
        return torch.cat([attack(net, x[s : s + size], y[s : s + size], eps=eps, generator=gen,
                                 **({"check": i == 0} if checks else {}))
                          for i, s in enumerate(range(0, len(y), size))])

    if spec.on == "float":
        with torch.random.fork_rng(devices=[]):
            return batches()
    with warnings.catch_warnings():
        if spec.on == "deployed" and model.randomised and settings.get("eot", 1) == 1:
            warnings.simplefilter("ignore", GradientMaskingWarning)
        return batches()
