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

Other choices: SGD (momentum 0.9, weight decay 5e-4) for the clone, Adam *without* weight decay for the
generator (as DFME's dfme/train.py), DFME's multi-step schedule (x0.3 at 10 %, 30 %, 50 % of the
iterations the budget pays for, so the schedule scales with the budget); the clone is in eval mode
while probes are evaluated (as DFME), the generator always in train mode.

Defense-aware (``defense_aware=True``; Kerckhoffs: the attacker knows the victim's answer function
``A`` = defense and output format): every answer is inverted as it arrives, to the clean probabilities
nearest it that ``A`` maps onto it (:func:`~qrobust.attacks.extraction.defense_aware.recover_probabilities`,
from the answer itself, ``inversion_steps`` Adam steps; as the defense-aware KnockoffNets), and both steps
then run unchanged on the recovered probabilities, so the clone fits the clean model under the defense.
Not the clone inside ``A`` (``l1(log A(softmax(C(x))), log y~)``), which we ran first: DCP with gamma < 1
is not monotone (a probability of 1e-6 becomes ~0.42 before normalising), so from a random clone that
loss has preimages with the true class at ~0; on 1,969 random answers below full's DCP threshold, fitting
``A(softmax(z))`` to the answer from a random ``z`` kept the argmax on 44% of rows (the true class at a
median 4e-6), inverting from the answer on 99% (docs/divqat.md: it gave clones at 0.1-39% at 1M queries).
Without a defense (or with a piecewise-constant one) it is the plain attack, step for step.

Settings: :class:`DFMEConfig` (each listed once, with its meaning). Speed (docs/divqat.md, "Speed of
DFME and MAZE"): the clone and the generator run in channels-last memory format during the attack
(restored after), and ``precision="bf16"`` autocasts their training steps and the generator's forwards
to bfloat16 (CPUs with AVX-512-BF16/AMX, GPUs); the clone's forwards on the zeroth-order probes stay
in float32 whatever the precision, since a forward difference at eps = 1e-3 needs it. An 8-bit victim
answers from its int8 model (:class:`~qrobust.attacks.extraction.victim.Victim`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrobust.attacks.extraction.base import ExtractionConfig, register_extraction
from qrobust.attacks.extraction.defense_aware import defense_aware_answer, recover_probabilities
from qrobust.attacks.extraction.knockoff import build_optimizer, seeded_generator, victim_image_shape
from qrobust.attacks.extraction.metrics import ExtractionResult, clone_accuracy, ledger_delta
from qrobust.attacks.extraction.victim import QueryBudgetExhausted, Victim
from qrobust.checks import check_bool, check_choice, check_int, check_non_negative, check_positive
from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS
from qrobust.utils import eval_mode, module_device

_LOG_FLOOR = 1e-6  # victim probabilities are clamped here before the log (defenses can output exact 0)
SCHEDULES = ("multistep", "cosine", "none")
MULTISTEP_AT = (0.1, 0.3, 0.5)  # DFME: lr x MULTISTEP_GAMMA at these fractions of the iterations
MULTISTEP_GAMMA = 0.3


def mean_corrected_log(p: Tensor) -> Tensor:
    """``log max(p, 1e-6) - mean_k log max(p_k, 1e-6)``: the victim's logits up to a constant, what DFME's l1 compares."""
    log_p = p.clamp_min(_LOG_FLOOR).log()
    return log_p - log_p.mean(dim=1, keepdim=True)


def _widen(t: Tensor) -> Tensor:
    """bfloat16/float16 results of an autocast region back to float32; other dtypes as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


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
        check_int("width", width, 1)
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
        h = self.project(z).view(z.shape[0], *self.init_shape)
        if self.body[2].weight.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous(memory_format=torch.channels_last)  # the body's layout: no slow NCHW upsample
        h = self.body(h)
        return h if pre_activation else to_image(h)


# --------------------------------------------------------------------------- settings


@dataclass
class ZerothOrderConfig(ExtractionConfig):
    """Settings of the DFME/MAZE frame, each listed once (defaults: DFME's; :class:`MAZEConfig` changes some)."""

    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for the default generator; None = victim model's
    latent_dim: int = 256  # size of the generator's input z ~ N(0, I)
    generator_width: int = 64  # w of the default generator (conv widths 2w, w); unused with generator=
    batch_size: int = 256  # B: images per generator step and per clone step
    num_directions: int = 1  # m: random unit directions per zeroth-order gradient estimate
    eps: float = 1e-3  # forward-difference step along each direction, on the generator's pre-activation
    generator_steps: int = 1  # n_G: generator steps per iteration (each B (m + 1) queries)
    clone_steps: int = 5  # n_S: clone steps per iteration (each B queries)
    replay_steps: int = 0  # clone steps per iteration on stored (image, answer) pairs, no queries (MAZE)
    replay_capacity: int = 0  # pairs kept for replay (ring buffer); >= batch_size when replay_steps > 0
    reuse_probe_answers: bool = False  # first clone step reuses the generator step's unperturbed answers (MAZE)
    clone_optimizer: str = "sgd"  # "sgd" (with momentum) | "adam"
    lr_clone: float = 0.1  # the clone's initial learning rate
    momentum: float = 0.9  # SGD momentum (the clone's; the generator's too when it uses SGD)
    weight_decay: float = 5e-4  # the clone's L2 weight decay
    generator_optimizer: str = "adam"  # "adam" | "sgd" (with momentum)
    lr_generator: float = 5e-4  # the generator's initial learning rate
    generator_weight_decay: float = 0.0  # the generator's L2 weight decay (DFME's Adam: none)
    schedule: str = "multistep"  # lr schedule over the iterations the budget pays for: multistep|cosine|none
    precision: str = "fp32"  # "fp32" | "bf16": autocast clone training and generator (probes stay fp32)
    channels_last: bool = True  # clone and generator in channels-last memory during run() (restored after)
    defense_aware: bool = False  # Kerckhoffs: each answer is inverted through the victim's known answer function
    inversion_steps: int = 300  # defense-aware: Adam steps recovering the clean probabilities of each answer
    inversion_lr: float = 0.05  # defense-aware: the step size of that inversion

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_shape is not None:
            if not isinstance(self.image_shape, (tuple, list)) or len(self.image_shape) != 3:
                raise ConfigError(f"image_shape must be (C, H, W), got {self.image_shape!r}")
            self.image_shape = tuple(check_int("image_shape", v, 1) for v in self.image_shape)
        check_int("latent_dim", self.latent_dim, 1)
        check_int("generator_width", self.generator_width, 1)
        check_int("batch_size", self.batch_size, 2)
        check_int("num_directions", self.num_directions, 1)
        check_positive("eps", self.eps)
        check_int("generator_steps", self.generator_steps, 0)
        check_int("clone_steps", self.clone_steps, 1)
        check_int("replay_steps", self.replay_steps, 0)
        check_int("replay_capacity", self.replay_capacity, self.batch_size if self.replay_steps else 0)
        check_bool("reuse_probe_answers", self.reuse_probe_answers)
        for name in ("clone_optimizer", "generator_optimizer"):
            check_choice(name, getattr(self, name), ("sgd", "adam"))
        check_positive("lr_clone", self.lr_clone)
        check_positive("lr_generator", self.lr_generator)
        for name in ("momentum", "weight_decay", "generator_weight_decay"):
            check_non_negative(name, getattr(self, name))
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("precision", self.precision, ("fp32", "bf16"))
        check_bool("channels_last", self.channels_last)
        check_bool("defense_aware", self.defense_aware)
        check_int("inversion_steps", self.inversion_steps, 1)
        check_positive("inversion_lr", self.inversion_lr)

    @property
    def cost_per_iteration(self) -> int:
        """Queries per iteration: ``B (n_G (m + 1) + n_S)``, minus B when a clone step reuses answers."""
        b = self.batch_size
        cost = b * (self.generator_steps * (self.num_directions + 1) + self.clone_steps)
        return cost - b if self.reuse_probe_answers and self.generator_steps > 0 else cost


@dataclass
class DFMEConfig(ZerothOrderConfig):
    """DFME's settings (Truong et al. 2021, dfme/train.py and run_cifar_dfme.sh): the frame's defaults."""


# --------------------------------------------------------------------------- schedules


def lr_factor(schedule: str, step: int, iterations: int) -> float:
    """Learning-rate multiplier after ``step`` of ``iterations`` scheduler steps (the run's planned iterations).

    ``multistep``: ``0.3 ** #{f in (0.1, 0.3, 0.5): step >= max(1, int(f * iterations))}`` (DFME);
    ``cosine``: ``(1 + cos(pi * step / iterations)) / 2`` (MAZE; 0 at the end); ``none``: 1.
    """
    check_choice("schedule", schedule, SCHEDULES)
    if schedule == "none":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, iterations) / iterations))
    milestones = {max(1, int(f * iterations)) for f in MULTISTEP_AT}
    return MULTISTEP_GAMMA ** sum(step >= m for m in milestones)


def make_schedules(
    optimizers: list[torch.optim.Optimizer], schedule: str, iterations: int
) -> list[torch.optim.lr_scheduler.LRScheduler]:
    """One :func:`lr_factor` schedule per optimizer over ``iterations`` steps (stepped once per iteration)."""
    check_int("iterations", iterations, 1)
    return [
        torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(schedule, step, iterations)) for o in optimizers
    ]


@contextlib.contextmanager
def memory_format(modules: list[nn.Module], fmt: torch.memory_format) -> Iterator[None]:
    """Convert ``modules`` to ``fmt`` inside the block; a module that was contiguous is made contiguous again."""
    contiguous = [all(p.is_contiguous() for p in m.parameters() if p.dim() == 4) for m in modules]
    for m in modules:
        m.to(memory_format=fmt)
    try:
        yield
    finally:
        for m, was in zip(modules, contiguous, strict=True):
            if was:
                m.to(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- the frame


class ZerothOrderExtraction:
    """The DFME/MAZE frame; use :class:`DFME` or :class:`~qrobust.attacks.extraction.maze.MAZE`.

    ``Attack(victim, clone, config=None, *, generator=None, **overrides)``: ``config`` is the attack's
    config (or a mapping of its settings, or None for the defaults), ``overrides`` replace single
    settings, ``generator`` is a module with ``forward(z, pre_activation=True) -> h`` (default:
    :class:`Generator` of ``image_shape``, ``latent_dim`` and ``generator_width``). The clone and the
    generator are trained in place.
    """

    name = "zeroth-order"
    config_class: type[ZerothOrderConfig] = ZerothOrderConfig
    inputs = ("generator",)

    def __init__(
        self,
        victim: Victim,
        clone: nn.Module,
        config: ZerothOrderConfig | dict | None = None,
        *,
        generator: nn.Module | None = None,
        **overrides: Any,
    ):
        self.config = cfg = self.config_class.build(config, **overrides)
        if victim.output != "probs":
            raise ConfigError(
                f"{self.name.upper()} needs the victim's full probability vector (output='probs'); this "
                f"victim answers output='{victim.output}'. Use KnockoffNets with hard_labels=True for label-only victims."
            )
        self.victim = victim
        self.clone = clone
        self.device = module_device(clone)
        if generator is None:
            shape = victim_image_shape(victim, cfg.image_shape)
            generator = Generator(shape, cfg.latent_dim, cfg.generator_width)
        self.generator = generator.to(self.device)
        self.opt_clone = build_optimizer(
            clone.parameters(), cfg.clone_optimizer, cfg.lr_clone, cfg.momentum, cfg.weight_decay
        )
        self.opt_generator = build_optimizer(
            self.generator.parameters(),
            cfg.generator_optimizer,
            cfg.lr_generator,
            cfg.momentum,
            cfg.generator_weight_decay,
        )
        self.rng = seeded_generator(cfg.seed, self.device)
        self._answer, self._defense_aware_note = (
            defense_aware_answer(victim) if cfg.defense_aware else (None, "off (the plain attack)"))
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
        return self.config.cost_per_iteration

    @property
    def _reuse(self) -> bool:
        return self.config.reuse_probe_answers and self.config.generator_steps > 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast for training forwards when ``precision="bf16"``."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ losses

    def read_answers(self, answers: Tensor) -> Tensor:
        """What both steps fit: the victim's answers, or, with ``defense_aware``, the clean probabilities
        recovered from each answer through the victim's known answer function (the module docstring)."""
        if self._answer is None:
            return answers
        cfg = self.config
        return recover_probabilities(answers, self._answer, cfg.inversion_steps, cfg.inversion_lr)

    def disagreement(self, logits: Tensor, p: Tensor) -> Tensor:
        """Per-sample D(clone logits, victim probabilities): l1 on mean-corrected log-probabilities."""
        return (logits - mean_corrected_log(p)).abs().mean(dim=1)

    # ------------------------------------------------------------------ select -> query -> fit

    def sample_latent(self, n: int) -> Tensor:
        return torch.randn(n, self.config.latent_dim, generator=self.rng, device=self.device)

    def estimate_gradient(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Forward-difference estimate of grad_h mean_i D_i at the generator's pre-activation ``h``.

        Queries the victim on B (m + 1) images. Returns ``(gradient, D at h, images at h, answers at h)``.
        The clone's forwards here run in eval mode and float32 (whatever ``precision``).
        """
        b, m, eps = h.shape[0], self.config.num_directions, self.config.eps
        d = h[0].numel()
        with torch.no_grad():
            u = torch.randn(b, m, d, generator=self.rng, device=h.device, dtype=h.dtype)
            u = (u / u.norm(dim=2, keepdim=True)).view(b, m, *h.shape[1:])
            points = torch.cat([h.detach().unsqueeze(1) + eps * u, h.detach().unsqueeze(1)], dim=1)
            x = to_image(points.flatten(0, 1))  # per sample: m probes, then the unperturbed point
            answers = self.read_answers(self.victim.query(x, phase=self.phase_generator))
            with eval_mode(self.clone):
                logits = torch.cat([self.clone(chunk) for chunk in x.split(self.victim.batch_size)])
            loss = self.disagreement(logits, answers.to(logits.device)).view(b, m + 1)
            slopes = (loss[:, :m] - loss[:, m:]) / eps  # [B, m] directional derivatives
            grad = (d / m) * torch.einsum("bm,bm...->b...", slopes, u) / b
        x_base = x.view(b, m + 1, *h.shape[1:])[:, m]
        y_base = answers.view(b, m + 1, -1)[:, m]
        return grad, loss[:, m].mean(), x_base, y_base

    def generator_step(self) -> tuple[Tensor, Tensor, Tensor]:
        """One zeroth-order ascent step of the generator; returns the unperturbed (images, answers, D)."""
        self.generator.train()
        with self._autocast():
            h = self.generator(self.sample_latent(self.config.batch_size), pre_activation=True)
        h = _widen(h)
        grad, loss, x_base, y_base = self.estimate_gradient(h)
        self.opt_generator.zero_grad(set_to_none=True)
        h.backward(-grad)  # ascent on mean D
        self.opt_generator.step()
        return x_base, y_base, loss

    def query_batch(self) -> tuple[Tensor, Tensor]:
        """Fresh generator images and the victim's answers (B queries)."""
        with torch.no_grad(), self._autocast():
            x = self.generator(self.sample_latent(self.config.batch_size))
        x = _widen(x)
        return x, self.read_answers(self.victim.query(x, phase=self.phase_clone)).to(self.device)

    def clone_loss(self, logits: Tensor, answers: Tensor) -> Tensor:
        return self.disagreement(logits, answers).mean()

    def fit_step(self, x: Tensor, answers: Tensor) -> Tensor:
        """One optimizer step of the clone on (x, victim answers); returns the loss (a detached tensor)."""
        self.clone.train()
        with self._autocast():
            logits = self.clone(x)
        loss = self.clone_loss(_widen(logits), answers)
        self.opt_clone.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_clone.step()
        return loss.detach()

    # ------------------------------------------------------------------ experience replay (MAZE)

    def _remember(self, x: Tensor, y: Tensor) -> None:
        capacity = self.config.replay_capacity
        if not self.config.replay_steps:
            return
        if self._replay_x is None:
            self._replay_x = x.new_empty(capacity, *x.shape[1:])
            self._replay_y = y.new_empty(capacity, *y.shape[1:])
        slots = (self._replay_next + torch.arange(x.shape[0], device=x.device)) % capacity
        self._replay_x[slots] = x.detach()
        self._replay_y[slots] = y.detach()
        self._replay_next = (self._replay_next + x.shape[0]) % capacity
        self._replay_size = min(self._replay_size + x.shape[0], capacity)

    def replay(self) -> Tensor | None:
        """``replay_steps`` clone steps on stored (image, answer) pairs; no queries. Mean loss or None."""
        b = self.config.batch_size
        if self._replay_size < b:
            return None
        losses = []
        for _ in range(self.config.replay_steps):
            idx = torch.randint(self._replay_size, (b,), generator=self.rng, device=self.device)
            losses.append(self.fit_step(self._replay_x[idx], self._replay_y[idx]))
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ the loop

    def _ensure_budget(self, n: int, phase: str) -> None:
        """Stop before computing anything when the victim would refuse the next ``n`` queries."""
        if self.victim.remaining < n:
            raise QueryBudgetExhausted(n, self.victim.remaining, self.victim.budget, phase)

    def _schedulers(self, planned: int) -> list[torch.optim.lr_scheduler.LRScheduler]:
        if self.config.schedule == "none":
            return []
        return make_schedules([self.opt_clone, self.opt_generator], self.config.schedule, planned)

    def run(
        self,
        num_queries: int | None = None,
        eval_data: tuple[Tensor, Tensor] | None = None,
        eval_every: int | None = None,
    ) -> ExtractionResult:
        """Run ``num_queries // cost_per_iteration`` iterations (default budget: ``victim.remaining``).

        Each iteration: ``generator_steps`` generator steps, ``clone_steps`` clone steps,
        ``replay_steps`` replay steps, then one step of the learning-rate schedules (planned over the
        iterations the budget pays for). Before every victim call the remaining budget is checked; when it
        does not cover the call, the attack stops there and returns the clone as trained so far with
        ``stopped_early=True``. History: (queries spent, clone accuracy or None) at the start, every
        ``eval_every`` iterations and at the end. ``info["seconds"]`` splits the wall time into
        ``attack`` (queries and training) and ``eval``.
        """
        cfg = self.config
        num_queries = self.victim.remaining if num_queries is None else num_queries
        check_int("num_queries", num_queries, 1)
        cost = self.cost_per_iteration
        planned = num_queries // cost
        if planned == 0:
            raise ConfigError(
                f"num_queries={num_queries} does not cover one {self.name.upper()} iteration ({cost} queries = "
                f"B {cfg.batch_size} x (n_G {cfg.generator_steps} x (m {cfg.num_directions} + 1) + "
                f"n_S {cfg.clone_steps}){' - B (reused)' if self._reuse else ''})"
            )
        if eval_every is not None:
            check_int("eval_every", eval_every, 1)
        used_before, ledger_before = self.victim.used, self.victim.ledger
        schedulers = self._schedulers(planned)
        seconds = {"attack": 0.0, "eval": 0.0}

        def spent() -> int:
            return self.victim.used - used_before

        def evaluate() -> float | None:
            if eval_data is None:
                return None
            t0 = time.perf_counter()
            accuracy = clone_accuracy(self.clone, *eval_data)
            seconds["eval"] += time.perf_counter() - t0
            return accuracy

        fmt = torch.channels_last if cfg.channels_last else None
        t_start = time.perf_counter()
        history = [(0, evaluate())]
        done, stopped, losses = 0, False, {}
        bar = tqdm(total=planned, desc=self.name, disable=not cfg.progress, leave=False)
        try:
            with memory_format([self.clone, self.generator], fmt) if fmt else contextlib.nullcontext():
                for _ in range(planned):
                    reused: tuple[Tensor, Tensor] | None = None
                    for _ in range(cfg.generator_steps):
                        self._ensure_budget(cfg.batch_size * (cfg.num_directions + 1), self.phase_generator)
                        x_base, y_base, losses["generator"] = self.generator_step()
                        reused = (x_base, y_base.to(self.device))
                    for step in range(cfg.clone_steps):
                        if step == 0 and self._reuse and reused is not None:
                            x, y = reused
                        else:
                            self._ensure_budget(cfg.batch_size, self.phase_clone)
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
                    if eval_every is not None and done % eval_every == 0 and done < planned:
                        history.append((spent(), evaluate()))
        except QueryBudgetExhausted:
            stopped = True  # nothing of the refused call was answered; keep everything learnt so far
        finally:
            bar.close()
        seconds["attack"] = time.perf_counter() - t_start - seconds["eval"]
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
                "last_losses": {k: float(v) for k, v in losses.items()},
                "answers_from": self.victim.answers_from,
                "defense_aware": self._defense_aware_note,
                "seconds": seconds,
            },
        )


@ATTACKS.register("dfme")
@register_extraction("dfme")
class DFME(ZerothOrderExtraction):
    """Data-Free Model Extraction (Truong et al. 2021): l1 on mean-corrected log-probabilities.

    ``DFME(victim, clone, config=None, *, generator=None, **overrides)`` with a :class:`DFMEConfig`
    (DFME's settings by default: B 256, m 1, n_G 1, n_S 5, SGD lr 0.1 for the clone, Adam lr 5e-4 without
    weight decay for the generator, multistep schedule); see :class:`ZerothOrderExtraction`.
    """

    name = "dfme"
    config_class = DFMEConfig
