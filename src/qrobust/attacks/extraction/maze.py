"""MAZE: data-free Model stealing via Zeroth-order gradient Estimation (Kariyappa et al., CVPR 2021).

The DFME frame (:mod:`.dfme`: generator G, clone C, zeroth-order generator steps, clone steps) with
MAZE's choices (sanjaykariyappa/MAZE, src/attacks/maze.py and attack_utils.py):

* disagreement = forward KL between the victim's and the clone's distributions
  ``D(x) = KL(p(x) || softmax(C(x))) = sum_k p_k (log p_k - log q_k)``, for the generator (maximised
  through the zeroth-order estimate ``(d/m) sum_j [(D(h + eps u_j) - D(h)) / eps] u_j``) and the clone
  (minimised, batch mean);
* more directions (m = 10), B = 128, n_G = 1, n_S = 5, SGD for both networks, cosine schedule;
* the first clone step of an iteration reuses the victim's answers at the generator step's
  unperturbed images (already paid for), as MAZE's code does, so the cost per iteration is
  ``B (n_G (m + 1) + n_S - 1)``;
* experience replay: the clone's training pairs (image, answer) go to a buffer and every iteration
  ends with ``replay_steps`` clone steps on batches drawn uniformly from it (no queries). MAZE keeps
  every pair ever queried; we keep the last ``replay_capacity`` (a ring buffer on the clone's device)
  so memory stays bounded.

MAZE's optional GAN term on a few real seed images (its "PD-MAZE" variant) is not implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.extraction.dfme import ZerothOrderExtraction
from qrobust.attacks.extraction.victim import Victim
from qrobust.registry import ATTACKS


def kl_disagreement(logits: Tensor, p: Tensor) -> Tensor:
    """Per-sample ``KL(p || softmax(logits)) = sum_k p_k (log p_k - log q_k)``, with 0 log 0 = 0."""
    return (torch.xlogy(p, p) - p * F.log_softmax(logits, dim=1)).sum(dim=1)


@ATTACKS.register("maze")
class MAZE(ZerothOrderExtraction):
    """MAZE: KL disagreement, more directions, experience replay (see the module docstring).

    Args:
        victim: a :class:`Victim` answering probabilities (``output="probs"``).
        clone: the attacker's model (trained in place).
        image_shape: (C, H, W) of the victim's inputs; sizes the default generator.
        generator: a module with ``forward(z, pre_activation=True) -> h``; default DFME's generator.
        latent_dim: size of z (MAZE: 100).
        batch_size: B (MAZE: 128).
        num_directions: m (MAZE: 10).
        eps: forward-difference step (MAZE's mu: 1e-3).
        generator_steps: n_G (1). clone_steps: n_S (5). replay_steps: replay clone steps per iteration (10).
        replay_capacity: (image, answer) pairs kept for replay.
        lr_clone: SGD lr of the clone (0.1). lr_generator: SGD lr of the generator (1e-4).
        momentum, weight_decay: SGD settings (0.9, 5e-4).
        schedule: "cosine" (MAZE), "multistep" or "none".
        progress: tqdm bar (default off). seed: seed of the attack's own draws.
    """

    name = "maze"

    def __init__(
        self,
        victim: Victim,
        clone: nn.Module,
        *,
        image_shape: tuple[int, int, int],
        generator: nn.Module | None = None,
        latent_dim: int = 100,
        batch_size: int = 128,
        num_directions: int = 10,
        eps: float = 1e-3,
        generator_steps: int = 1,
        clone_steps: int = 5,
        replay_steps: int = 10,
        replay_capacity: int = 100_000,
        lr_clone: float = 0.1,
        lr_generator: float = 1e-4,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "cosine",
        progress: bool = False,
        seed: int | None = None,
    ):
        super().__init__(
            victim,
            clone,
            image_shape=image_shape,
            generator=generator,
            latent_dim=latent_dim,
            batch_size=batch_size,
            num_directions=num_directions,
            eps=eps,
            generator_steps=generator_steps,
            clone_steps=clone_steps,
            clone_optimizer="sgd",
            lr_clone=lr_clone,
            generator_optimizer="sgd",
            lr_generator=lr_generator,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            replay_steps=replay_steps,
            replay_capacity=replay_capacity,
            reuse_probe_answers=True,
            progress=progress,
            seed=seed,
        )

    def disagreement(self, logits: Tensor, p: Tensor) -> Tensor:
        """Per-sample forward KL of the victim's answer to the clone's distribution."""
        return kl_disagreement(logits, p)
