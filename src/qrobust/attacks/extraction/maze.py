"""MAZE: data-free Model stealing via Zeroth-order gradient Estimation (Kariyappa et al., CVPR 2021).

The DFME frame (:mod:`.dfme`: generator G, clone C, zeroth-order generator steps, clone steps) with
MAZE's choices (sanjaykariyappa/MAZE, src/attacks/maze.py and attack_utils.py):

* disagreement = forward KL between the victim's and the clone's distributions
  ``D(x) = KL(p(x) || softmax(C(x))) = sum_k p_k (log p_k - log q_k)``, for the generator (maximised
  through the zeroth-order estimate ``(d/m) sum_j [(D(h + eps u_j) - D(h)) / eps] u_j``) and the clone
  (minimised, batch mean);
* more directions (m = 10), B = 128, n_G = 1, n_S = 5, SGD (momentum 0.9, weight decay 5e-4) for both
  networks, cosine schedule;
* the first clone step of an iteration reuses the victim's answers at the generator step's
  unperturbed images (already paid for), as MAZE's code does, so the cost per iteration is
  ``B (n_G (m + 1) + n_S - 1)``;
* experience replay: the clone's training pairs (image, answer) go to a buffer and every iteration
  ends with ``replay_steps`` clone steps on batches drawn uniformly from it (no queries). MAZE keeps
  every pair ever queried; we keep the last ``replay_capacity`` (a ring buffer on the clone's device)
  so memory stays bounded.

MAZE's optional GAN term on a few real seed images (its "PD-MAZE" variant) is not implemented.
Settings: :class:`MAZEConfig` (the frame's settings with MAZE's defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from qrobust.attacks.extraction.base import register_extraction
from qrobust.attacks.extraction.dfme import ZerothOrderConfig, ZerothOrderExtraction
from qrobust.registry import ATTACKS


def kl_disagreement(logits: Tensor, p: Tensor) -> Tensor:
    """Per-sample ``KL(p || softmax(logits)) = sum_k p_k (log p_k - log q_k)``, with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - p * F.log_softmax(logits, dim=1)).sum(dim=1)


@dataclass
class MAZEConfig(ZerothOrderConfig):
    """MAZE's settings (sanjaykariyappa/MAZE): the frame's settings (see :class:`ZerothOrderConfig` for
    their meaning) with these defaults."""

    latent_dim: int = 100
    batch_size: int = 128
    num_directions: int = 10
    replay_steps: int = 10
    replay_capacity: int = 100_000
    reuse_probe_answers: bool = True
    generator_optimizer: str = "sgd"
    lr_generator: float = 1e-4
    generator_weight_decay: float = 5e-4
    schedule: str = "cosine"


@ATTACKS.register("maze")
@register_extraction("maze")
class MAZE(ZerothOrderExtraction):
    """MAZE: KL disagreement, more directions, experience replay (see the module docstring).

    ``MAZE(victim, clone, config=None, *, generator=None, **overrides)`` with a :class:`MAZEConfig`;
    see :class:`~qrobust.attacks.extraction.dfme.ZerothOrderExtraction`.
    """

    name = "maze"
    config_class = MAZEConfig

    def disagreement(self, logits: Tensor, p: Tensor) -> Tensor:
        """Per-sample forward KL of the victim's answer to the clone's distribution."""
        return kl_disagreement(logits, p)
