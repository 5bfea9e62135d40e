"""DFME: Data-Free Model Extraction (Truong et al., CVPR 2021), and the frame MAZE shares with it.

Threat model: no data at all. A generator G proposes queries, the victim V answers (defended
probabilities), a clone C learns from the answers; G is trained to find inputs where C and V disagree:

    clone step     min_C  D(C(x), V(x)),      x = G(z), z ~ N(0, I)
    generator step max_G  D(C(x), V(x))       (V is a black box: its gradient is estimated)

DFME's disagreement is the l1 distance between the clone's logits and the victim's *mean-corrected*
log-probabilities (the victim gives probabilities only; DFME's code recovers logits up to a constant):

    t(x) = log p(x) - (1/K) sum_k log p_k(x)              (log of p clamped at 1e-6)
    D_l1(x) = (1/K) sum_k | C(x)_k - t(x)_k |

Images are ``x = (tanh(h) + 1) / 2`` in [0, 1], where ``h = G(z)`` is the generator's pre-activation.
The generator step estimates the gradient with respect to ``h`` (as DFME's code does, so that every
probe ``h + eps u`` is again a valid image) by forward differences over ``m`` random directions
``u_j`` uniform on the unit sphere of R^d (d = C*H*W), eps = 1e-3:

    grad_h D(h) ~= (d / m) sum_j [(D(h + eps u_j) - D(h)) / eps] u_j

then back-propagates it through G (``h.backward(-grad / B)``: ascent on the batch mean of D). DFME's
code divides the l1 estimate by K and B; we divide by B only (the batch mean). Constant factors do
not change Adam's steps.

Query cost, every image counted (probes included): a generator step asks ``B (m + 1)`` images (the
m probes and the unperturbed point), a clone step ``B`` images::

    cost per iteration = B * (n_G (m + 1) + n_S)

MAZE (see :mod:`.maze`) runs the same frame with the KL divergence, more directions, experience
replay and the reuse of the generator step's unperturbed answers for the first clone step.

Other choices: SGD (momentum 0.9, weight decay 5e-4) for the clone, Adam for the generator, DFME's
multi-step schedule (x0.3 at 10 %, 30 %, 50 % of the planned iterations); the clone is in eval mode
while probes are evaluated (as DFME), the generator always in train mode.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrobust.attacks.extraction.knockoff import build_optimizer, check_int, check_positive, seeded_generator
from qrobust.attacks.extraction.metrics import ExtractionResult, _device, clone_accuracy, ledger_delta
from qrobust.attacks.extraction.victim import QueryBudgetExhausted, Victim
from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS
from qrobust.utils import eval_mode

_LOG_FLOOR = 1e-6  # victim probabilities are clamped here before the log (defenses can output exact 0)


def to_image(h: Tensor) -> Tensor:
    """Generator pre-activation -> image in [0, 1]: ``(tanh(h) + 1) / 2``."""
    return (torch.tanh(h) + 1) / 2


class Generator(nn.Module):
    """DFME's generator (GeneratorA) sized to the data: z -> h of shape ``image_shape``.

    Linear -> [2w, H/4, W/4] -> BN -> up x2 -> conv 3x3 (2w) -> BN -> LeakyReLU -> up x2 ->
    conv 3x3 (w) -> BN -> LeakyReLU -> conv 3x3 (C) -> BN (no affine). ``forward(z)`` returns the image
    ``to_image(h)``; ``forward(z, pre_activation=True)`` returns ``h``. H and W must be multiples of 4
    (1x28x28 and 3x32x32 both are).
    """

    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int = 256, width: int = 64):
        super().__init__()
        if len(image_shape) != 3:
            raise ConfigError(f"image_shape must be (C, H, W), got {image_shape!r}")
        channels, height, width_px = image_shape
        if height % 4 or width_px % 4:
            raise ConfigError(f"the generator needs H and W divisible by 4, got {height}x{width_px}")
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.init_shape = (2 * width, height // 4, width_px // 4)
        self.project = nn.Linear(latent_dim, math.prod(self.init_shape))
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * width),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.LeakyReLU(0.2),
            nn.Conv2d(width, channels, 3, padding=1),
            nn.BatchNorm2d(channels, affine=False),
        )

    def forward(self, z: Tensor, pre_activation: bool = False) -> Tensor:
        h = self.body(self.project(z).view(z.shape[0], *self.init_shape))
        return h if pre_activation else to_image(h)


class ZerothOrderExtraction:
    """The DFME/MAZE frame; use :class:`DFME` or :class:`~qrobust.attacks.extraction.maze.MAZE`."""

    name = "zeroth-order"
    loss = "l1"

    def __init__(
        self,
        victim: Victim,
        clone: nn.Module,
        *,
        image_shape: tuple[int, int, int],
        generator: nn.Module | None,
        latent_dim: int,
        batch_size: int,
        num_directions: int,
        eps: float,
        generator_steps: int,
        clone_steps: int,
        clone_optimizer: str,
        lr_clone: float,
        generator_optimizer: str,
        lr_generator: float,
        momentum: float,
        weight_decay: float,
        schedule: str,
        replay_steps: int,
        replay_capacity: int,
        reuse_probe_answers: bool,
        progress: bool,
        seed: int | None,
    ):
        if victim.output != "probs":
            raise ConfigError(
                f"{self.name.upper()} needs the victim's full probability vector (output='probs'); this "
                f"victim answers output='{victim.output}'. Use KnockoffNets with hard_labels=True for label-only victims."
            )
        if schedule not in ("multistep", "cosine", "none"):
            raise ConfigError(f"schedule must be 'multistep', 'cosine' or 'none', got '{schedule}'")
        self.victim = victim
        self.clone = clone
        self.device = _device(clone)
        self.generator = generator if generator is not None else Generator(image_shape, latent_dim)
        self.generator.to(self.device)
        self.latent_dim = check_int("latent_dim", latent_dim, 1)
        self.batch_size = check_int("batch_size", batch_size, 2)
        self.num_directions = check_int("num_directions", num_directions, 1)
        self.eps = check_positive("eps", eps)
        self.generator_steps = check_int("generator_steps", generator_steps, 0)
        self.clone_steps = check_int("clone_steps", clone_steps, 1)
        self.replay_steps = check_int("replay_steps", replay_steps, 0)
        self.replay_capacity = check_int(
            "replay_capacity", replay_capacity, batch_size if replay_steps else 0
        )
        self.reuse_probe_answers = bool(reuse_probe_answers) and self.generator_steps > 0
        self.schedule = schedule
        self.opt_clone = build_optimizer(
            clone.parameters(), clone_optimizer, lr_clone, momentum, weight_decay
        )
        self.opt_generator = build_optimizer(
            self.generator.parameters(), generator_optimizer, lr_generator, momentum, weight_decay
        )
        self.progress = progress
        self.rng = seeded_generator(seed, self.device)
        self._replay_x: Tensor | None = None
        self._replay_y: Tensor | None = None
        self._replay_size = 0
        self._replay_next = 0

    @property
    def phase_generator(self) -> str:
        return f"{self.name}_generator"

    @property
    def phase_clone(self) -> str:
        return f"{self.name}_clone"

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``B (n_G (m + 1) + n_S)``, minus B when a clone step reuses answers."""
        b = self.batch_size
        cost = b * (self.generator_steps * (self.num_directions + 1) + self.clone_steps)
        return cost - b if self.reuse_probe_answers else cost

    # ------------------------------------------------------------------ losses

    def disagreement(self, logits: Tensor, p: Tensor) -> Tensor:
        """Per-sample D(clone logits, victim probabilities): l1 on mean-corrected log-probabilities."""
        log_p = p.clamp_min(_LOG_FLOOR).log()
        target = log_p - log_p.mean(dim=1, keepdim=True)
        return (logits - target).abs().mean(dim=1)

    # ------------------------------------------------------------------ select -> query -> fit

    def sample_latent(self, n: int) -> Tensor:
        return torch.randn(n, self.latent_dim, generator=self.rng, device=self.device)

    def estimate_gradient(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Forward-difference estimate of grad_h mean_i D_i at the generator's pre-activation ``h``.

        Queries the victim on B (m + 1) images. Returns ``(gradient, D at h, images at h, answers at h)``.
        """
        b, m = h.shape[0], self.num_directions
        d = h[0].numel()
        with torch.no_grad():
            u = torch.randn(b, m, d, generator=self.rng, device=h.device, dtype=h.dtype)
            u = (u / u.norm(dim=2, keepdim=True)).view(b, m, *h.shape[1:])
            points = torch.cat([h.detach().unsqueeze(1) + self.eps * u, h.detach().unsqueeze(1)], dim=1)
            x = to_image(points.flatten(0, 1))  # per sample: m probes, then the unperturbed point
            answers = self.victim.query(x, phase=self.phase_generator)
            with eval_mode(self.clone):
                logits = torch.cat([self.clone(chunk) for chunk in x.split(self.victim.batch_size)])
            loss = self.disagreement(logits, answers.to(logits.device)).view(b, m + 1)
            slopes = (loss[:, :m] - loss[:, m:]) / self.eps  # [B, m] directional derivatives
            grad = (d / m) * torch.einsum("bm,bm...->b...", slopes, u) / b
        x_base = x.view(b, m + 1, *h.shape[1:])[:, m]
        y_base = answers.view(b, m + 1, -1)[:, m]
        return grad, loss[:, m].mean(), x_base, y_base

    def generator_step(self) -> tuple[Tensor, Tensor, float]:
        """One zeroth-order ascent step of the generator; returns the unperturbed (images, answers, D)."""
        self.generator.train()
        h = self.generator(self.sample_latent(self.batch_size), pre_activation=True)
        grad, loss, x_base, y_base = self.estimate_gradient(h)
        self.opt_generator.zero_grad(set_to_none=True)
        h.backward(-grad)  # ascent on mean D
        self.opt_generator.step()
        return x_base, y_base, loss.item()

    def query_batch(self) -> tuple[Tensor, Tensor]:
        """Fresh generator images and the victim's answers (B queries)."""
        with torch.no_grad():
            x = self.generator(self.sample_latent(self.batch_size))
        return x, self.victim.query(x, phase=self.phase_clone).to(self.device)

    def clone_loss(self, logits: Tensor, answers: Tensor) -> Tensor:
        return self.disagreement(logits, answers).mean()

    def fit_step(self, x: Tensor, answers: Tensor) -> float:
        """One optimizer step of the clone on (x, victim answers)."""
        self.clone.train()
        loss = self.clone_loss(self.clone(x), answers)
        self.opt_clone.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_clone.step()
        return loss.item()

    # ------------------------------------------------------------------ experience replay (MAZE)

    def _remember(self, x: Tensor, y: Tensor) -> None:
        if not self.replay_steps:
            return
        if self._replay_x is None:
            self._replay_x = x.new_empty(self.replay_capacity, *x.shape[1:])
            self._replay_y = y.new_empty(self.replay_capacity, *y.shape[1:])
        slots = (self._replay_next + torch.arange(x.shape[0], device=x.device)) % self.replay_capacity
        self._replay_x[slots] = x.detach()
        self._replay_y[slots] = y.detach()
        self._replay_next = int(slots[-1] + 1) % self.replay_capacity
        self._replay_size = min(self._replay_size + x.shape[0], self.replay_capacity)

    def replay(self) -> float | None:
        """``replay_steps`` clone steps on stored (image, answer) pairs; no queries."""
        if self._replay_size < self.batch_size:
            return None
        losses = []
        for _ in range(self.replay_steps):
            idx = torch.randint(self._replay_size, (self.batch_size,), generator=self.rng, device=self.device)
            losses.append(self.fit_step(self._replay_x[idx], self._replay_y[idx]))
        return sum(losses) / len(losses)

    # ------------------------------------------------------------------ the loop

    def _ensure_budget(self, n: int, phase: str) -> None:
        """Stop before computing anything when the victim would refuse the next ``n`` queries."""
        if self.victim.remaining < n:
            raise QueryBudgetExhausted(n, self.victim.remaining, self.victim.budget, phase)

    def _schedulers(self, planned: int) -> list[Any]:
        if self.schedule == "none":
            return []
        opts = (self.opt_clone, self.opt_generator)
        if self.schedule == "cosine":
            return [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=planned) for o in opts]
        milestones = sorted({max(1, int(f * planned)) for f in (0.1, 0.3, 0.5)})
        return [torch.optim.lr_scheduler.MultiStepLR(o, milestones=milestones, gamma=0.3) for o in opts]

    def run(
        self,
        *,
        num_queries: int | None = None,
        eval_data: tuple[Tensor, Tensor] | None = None,
        eval_every: int | None = None,
    ) -> ExtractionResult:
        """Run ``num_queries // cost_per_iteration`` iterations (default budget: ``victim.remaining``).

        Each iteration: ``generator_steps`` generator steps, ``clone_steps`` clone steps,
        ``replay_steps`` replay steps. Before every victim call the remaining budget is checked; when it
        does not cover the call, the attack stops there and returns the clone as trained so far with
        ``stopped_early=True``. History: (queries spent, clone accuracy or None) at the start, every
        ``eval_every`` iterations and at the end.
        """
        num_queries = self.victim.remaining if num_queries is None else num_queries
        check_int("num_queries", num_queries, 1)
        cost = self.cost_per_iteration
        planned = num_queries // cost
        if planned == 0:
            raise ConfigError(
                f"num_queries={num_queries} does not cover one {self.name.upper()} iteration ({cost} queries = "
                f"B {self.batch_size} x (n_G {self.generator_steps} x (m {self.num_directions} + 1) + "
                f"n_S {self.clone_steps}){' - B (reused)' if self.reuse_probe_answers else ''})"
            )
        if eval_every is not None:
            check_int("eval_every", eval_every, 1)
        used_before, ledger_before = self.victim.used, self.victim.ledger
        schedulers = self._schedulers(planned)

        def spent() -> int:
            return self.victim.used - used_before

        def evaluate() -> float | None:
            return None if eval_data is None else clone_accuracy(self.clone, *eval_data)

        history = [(0, evaluate())]
        done, stopped, losses = 0, False, {}
        bar = tqdm(total=planned, desc=self.name, disable=not self.progress, leave=False)
        try:
            for _ in range(planned):
                reused: tuple[Tensor, Tensor] | None = None
                for _ in range(self.generator_steps):
                    self._ensure_budget(self.batch_size * (self.num_directions + 1), self.phase_generator)
                    x_base, y_base, losses["generator"] = self.generator_step()
                    reused = (x_base, y_base.to(self.device))
                for step in range(self.clone_steps):
                    if step == 0 and self.reuse_probe_answers and reused is not None:
                        x, y = reused
                    else:
                        self._ensure_budget(self.batch_size, self.phase_clone)
                        x, y = self.query_batch()
                    losses["clone"] = self.fit_step(x, y)
                    self._remember(x, y)
                replay_loss = self.replay()
                if replay_loss is not None:
                    losses["replay"] = replay_loss
                for scheduler in schedulers:
                    scheduler.step()
                done += 1
                bar.update(1)
                bar.set_postfix(queries=spent())
                if eval_every is not None and done % eval_every == 0 and done < planned:
                    history.append((spent(), evaluate()))
        except QueryBudgetExhausted:
            stopped = True  # nothing of the refused call was answered; keep everything learnt so far
        finally:
            bar.close()
        history.append((spent(), evaluate()))
        return ExtractionResult(
            clone=self.clone,
            queries_used=spent(),
            iterations=done,
            stopped_early=stopped,
            history=history,
            ledger=ledger_delta(ledger_before, self.victim.ledger),
            info={
                "planned_iterations": planned,
                "cost_per_iteration": cost,
                "last_losses": losses,
            },
        )


@ATTACKS.register("dfme")
class DFME(ZerothOrderExtraction):
    """Data-Free Model Extraction (Truong et al. 2021): l1 on mean-corrected log-probabilities.

    Args:
        victim: a :class:`Victim` answering probabilities (``output="probs"``).
        clone: the attacker's model (trained in place).
        image_shape: (C, H, W) of the victim's inputs; sizes the default generator.
        generator: a module with ``forward(z, pre_activation=True) -> h``; default :class:`Generator`.
        latent_dim: size of z (DFME: 256).
        batch_size: B, images per generator/clone step (DFME: 256).
        num_directions: m, random directions per generator step (DFME: 1).
        eps: forward-difference step (DFME: 1e-3).
        generator_steps: n_G per iteration (DFME: 1). clone_steps: n_S per iteration (DFME: 5).
        lr_clone: SGD learning rate of the clone (DFME: 0.1). lr_generator: Adam lr (DFME: 5e-4).
        momentum, weight_decay: SGD settings (0.9, 5e-4).
        schedule: "multistep" (DFME), "cosine" or "none".
        progress: tqdm bar (default off). seed: seed of the attack's own draws (z, directions).
    """

    name = "dfme"

    def __init__(
        self,
        victim: Victim,
        clone: nn.Module,
        *,
        image_shape: tuple[int, int, int],
        generator: nn.Module | None = None,
        latent_dim: int = 256,
        batch_size: int = 256,
        num_directions: int = 1,
        eps: float = 1e-3,
        generator_steps: int = 1,
        clone_steps: int = 5,
        lr_clone: float = 0.1,
        lr_generator: float = 5e-4,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: str = "multistep",
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
            generator_optimizer="adam",
            lr_generator=lr_generator,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            replay_steps=0,
            replay_capacity=0,
            reuse_probe_answers=False,
            progress=progress,
            seed=seed,
        )
