"""The card's budgets: every size and count of the battery in one place (docs/card.md lists them).

``quick`` (~2 min for a Fashion-MNIST convnet on a 2-core CPU) and ``standard`` (~10 min) are the
user-facing budgets; ``test`` is for the test suite only (seconds, numbers without meaning).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qrobust.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    name: str
    eval_images: int  # test images every number is measured on (a fixed seeded subset)
    heldout_images: int  # other test images: the defender's DCP calibration
    evaluations: int  # forward passes per image behind expected / strict accuracy
    # extraction (KnockoffNets, Orekondy et al. 2019)
    knockoff_queries: int  # images the attacker sends (one query each)
    knockoff_epochs: int  # clone training epochs on the answers
    clone_width: int  # the clone: a fresh qrobust convnet of this width, for every model
    # patches (Brown et al. 2017), untargeted, square, random placement
    patch_steps: int  # Adam steps
    patch_batch: int  # images per step
    patch_images: int  # attacker images the patch is trained on
    patch_placements: int  # random placements per test image in the ASR
    # white-box L-inf
    apgd_steps: int  # APGD-CE iterations (one restart)
    eot: int  # gradient draws per step for randomised models (EOT)
    square_queries: int  # Square Attack queries per image
    latency_seconds: float  # time spent per throughput measurement
    latency_repeats: int  # batch-1 forwards behind the median latency
    # fixed battery settings (the same in every budget)
    patch_sizes: tuple[float, ...] = (0.05, 0.10)  # fraction of the image area
    eps: tuple[float, ...] = (2 / 255, 8 / 255)  # L-inf budgets
    eps_labels: tuple[str, ...] = ("2/255", "8/255")
    l1_budget: float = 0.6  # DCP transparency budget (mean l1 between defended and clean probabilities)
    dcp_gamma: float = 0.2
    dcp_nu: float = 1000.0
    masking_margin: float = 0.03  # another attack beating APGD-CE by more than this (strict robust accuracy) ...
    masking_images: int = 3  # ... and by at least this many images flags gradient masking
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BUDGETS: dict[str, Budget] = {
    "test": Budget("test", eval_images=24, heldout_images=48, evaluations=2, knockoff_queries=48, knockoff_epochs=1,
                   clone_width=4, patch_steps=3, patch_batch=16, patch_images=48, patch_placements=1, apgd_steps=3,
                   eot=2, square_queries=8, latency_seconds=0.01, latency_repeats=3),
    "quick": Budget("quick", eval_images=200, heldout_images=500, evaluations=4, knockoff_queries=2000,
                    knockoff_epochs=3, clone_width=16, patch_steps=60, patch_batch=32, patch_images=1000,
                    patch_placements=2, apgd_steps=20, eot=4, square_queries=200, latency_seconds=0.3,
                    latency_repeats=20),
    # standard: measured on a QAT-8 FMNIST convnet (issue 15), deployment + extraction + patches took 215 s
    # of CPU time; 1000 images x 1000 Square queries would have put the white-box section alone at ~20 min,
    # so it attacks 500 images (a 95% interval of about +-4 points) with 40 APGD steps and 400 queries.
    "standard": Budget("standard", eval_images=500, heldout_images=1000, evaluations=8, knockoff_queries=10000,
                       knockoff_epochs=5, clone_width=32, patch_steps=200, patch_batch=64, patch_images=5000,
                       patch_placements=4, apgd_steps=40, eot=8, square_queries=400, latency_seconds=1.0,
                       latency_repeats=50),
}
USER_BUDGETS = ("quick", "standard")


def get_budget(name: str | Budget) -> Budget:
    """A named budget (``quick``, ``standard``; ``test`` for tests) or a :class:`Budget` as it is."""
    if isinstance(name, Budget):
        return name
    if name not in BUDGETS:
        raise ConfigError(f"card budget '{name}' is unknown; use one of: {', '.join(USER_BUDGETS)}")
    return BUDGETS[name]
