"""KnockoffNets (Orekondy et al., CVPR 2019, "Knockoff Nets: Stealing Functionality of Black-Box Models").

Threat model: the attacker holds a *transfer set* of natural images from some other distribution (no
victim training data), queries the victim on them and trains a clone on the answers:

    select  x_1..x_n from the transfer set (n = query budget)
    query   y_i = victim(x_i)                       (defended probabilities, or one-hot labels)
    fit     min_theta  1/n sum_i  -sum_k y_ik log softmax(c_theta(x_i))_k      (soft-target CE)

``hard_labels=True`` trains on ``one_hot(argmax y_i)`` instead (the only option for a top-1 victim).

Sampling. ``"random"``: n images uniformly without replacement. ``"adaptive"``: the paper's gradient
bandit over coarse groups of the transfer set. Our simplification of Sec. 4.1.2:

* actions are groups of the transfer set: its coarse labels if ``transfer_groups`` is given, else
  ``num_groups`` k-means clusters of 4x4 average-pooled images (the paper uses the label hierarchy);
* images are drawn in rounds of ``batch_size``: each image picks a group from the policy
  ``pi = softmax(H)`` and an unused image of that group (without replacement; empty groups are masked);
* reward per image, each term in [0, 1] and averaged: certainty ``y_(1) - y_(2)`` (top-2 margin),
  diversity ``sum_k max(0, y_k - ybar_k)`` with ``ybar`` an exponential moving average (rate 0.1) of
  past answers (the paper uses a window of the last Delta answers), and loss ``1 - exp(-CE(y, c(x)))``
  with the clone's prediction before it sees the batch (the paper uses the raw CE);
* gradient-bandit update, averaged over the round:
  ``H <- H + bandit_lr * mean_i (r_i - rbar) (onehot(a_i) - pi)``, ``rbar`` = mean of all past rewards;
* the clone takes one optimizer step on each round's answers (online, as in the paper), then is fitted
  for ``epochs`` on everything collected, as in the random strategy.

Defense-aware (``defense_aware=True``, or the registered name ``knockoff-adaptive``): the attacker knows
the victim's answer function (defense and output format); it recovers the clean probabilities behind
each answer by passing candidates through that function before the loss, and fits the clone to them, so
the clone fits the clean model under the perturbation (:mod:`.defense_aware`, Kerckhoffs's principle).

Settings: :class:`KnockoffConfig` (each listed once, with its meaning); the transfer set is an input of
the attack, not a setting. Also here: :func:`prepare_transfer_set` (dtype, channels, size),
:func:`soft_cross_entropy`, :func:`fit_clone`, and :class:`RandomNoise` / :func:`random_noise_floor`: the
same fit on uniform-noise queries, the floor every extraction attack must beat.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrobust.attacks.extraction.base import ExtractionConfig, register_extraction
from qrobust.attacks.extraction.defense_aware import defense_aware_answer, recover_probabilities
from qrobust.attacks.extraction.metrics import ExtractionResult, clone_accuracy, ledger_delta
from qrobust.attacks.extraction.victim import QueryBudgetExhausted, Victim
from qrobust.checks import check_bool, check_choice, check_int, check_non_negative, check_positive
from qrobust.config import TrainSection
from qrobust.data import TensorLoader
from qrobust.errors import ConfigError
from qrobust.registry import ATTACKS
from qrobust.train.loop import fit
from qrobust.train.objectives import Objective, SoftTargetCrossEntropy
from qrobust.utils import eval_mode, module_device

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, RGB -> gray

# --------------------------------------------------------------------------- shared helpers


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private RNG for the attack's own draws; ``seed=None`` draws a seed from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def build_optimizer(
    params: Any, name: str, lr: float, momentum: float = 0.9, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """``"sgd"`` (with momentum) or ``"adam"`` (``momentum`` unused); weight decay as given."""
    check_positive("lr", lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be 'sgd' or 'adam', got '{name}'")


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """``mean_i -sum_k t_ik log softmax(z_i)_k``: cross-entropy against probability targets.

    Differs from ``KL(t || softmax(z))`` by the targets' entropy only, so both give the same gradient.
    """
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def prepare_transfer_set(images: Tensor, image_shape: tuple[int, int, int], batch_size: int = 1024) -> Tensor:
    """Turn images from any data set into float [N, C, H, W] in [0, 1] matching ``image_shape``.

    Accepts [N, H, W] (gray) or channels-first [N, C, H, W], uint8 (divided by 255) or float in
    [0, 1]. Channels: 1 -> 3 repeats gray, 3 -> 1 takes the BT.601 luma. Size: bilinear with
    antialiasing. Runs in chunks of ``batch_size`` to bound memory.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4:
        raise ConfigError(f"transfer images must be [N, H, W] or [N, C, H, W], got {tuple(images.shape)}")
    channels, height, width = image_shape
    if images.shape[1] not in (1, 3) or channels not in (1, 3):
        raise ConfigError(f"can convert between 1 and 3 channels only, got {images.shape[1]} -> {channels}")
    out = []
    for chunk in images.split(batch_size):
        chunk = chunk.float() / 255 if chunk.dtype == torch.uint8 else chunk.float()
        if chunk.shape[1] == 1 and channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        elif chunk.shape[1] == 3 and channels == 1:
            luma = torch.tensor(_LUMA, device=chunk.device).view(1, 3, 1, 1)
            chunk = (chunk * luma).sum(dim=1, keepdim=True)
        if chunk.shape[-2:] != (height, width):
            chunk = F.interpolate(
                chunk, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )
        out.append(chunk.clamp(0, 1))
    return torch.cat(out)


def fit_clone(
    clone: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    on_epoch: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "fit clone",
    objective: Objective | None = None,
) -> None:
    """Train ``clone`` on (x, probability targets y) with soft-target CE (:class:`SoftTargetCrossEntropy`,
    or ``objective``) in the one training loop :func:`qrobust.train.loop.fit`: shuffled mini-batches (order
    seeded from ``generator``), ``optimizer`` as given (its state carries over from adaptive sampling's
    online steps), constant learning rate. ``on_epoch(epoch)`` is called after each epoch."""
    if epochs == 0 or x.shape[0] == 0:
        return
    device = module_device(clone)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    loader = TensorLoader(x.to(device), y.to(device), batch_size, shuffle=True, seed=seed)
    train = TrainSection(epochs=epochs, batch_size=batch_size, schedule="constant", warmup_epochs=0.0,
                         channels_last=False, bf16=False, weight_decay=0.0)
    calls = iter(range(epochs))

    def evaluate(_: nn.Module) -> dict:
        if on_epoch is not None:
            on_epoch(next(calls))
        return {}

    fit(clone, loader, objective or SoftTargetCrossEntropy(), train, evaluate=evaluate, device=device, progress=progress,
        optimizer=optimizer, desc=f"{desc}: ", log_epochs=False)


def kmeans_groups(
    images: Tensor, num_groups: int, *, generator: torch.Generator, iterations: int = 10
) -> Tensor:
    """Cluster images (4x4 average-pooled, flattened) into ``num_groups`` groups with Lloyd's k-means."""
    feats = F.adaptive_avg_pool2d(images.float(), 4).flatten(1)
    num_groups = min(num_groups, feats.shape[0])
    pick = torch.randperm(feats.shape[0], generator=generator, device=generator.device)[:num_groups]
    centers = feats[pick.to(feats.device)].clone()
    for _ in range(iterations):
        assign = torch.cdist(feats, centers).argmin(dim=1)
        for g in range(num_groups):
            members = feats[assign == g]
            if len(members):
                centers[g] = members.mean(dim=0)
    return torch.cdist(feats, centers).argmin(dim=1)


def gradient_bandit_step(
    preference: Tensor, policy: Tensor, actions: Tensor, rewards: Tensor, baseline: float, lr: float
) -> Tensor:
    """Gradient-bandit update (Sutton & Barto, Sec. 2.8), averaged over a round of actions.

    ``H <- H + lr * mean_i (r_i - rbar) (onehot(a_i) - pi)``: an action rewarded above the baseline
    gains preference, the others lose in proportion to their probability.
    """
    onehot = F.one_hot(actions, preference.shape[0]).to(preference.dtype)
    return preference + lr * ((rewards - baseline)[:, None] * (onehot - policy)).mean(dim=0)


# --------------------------------------------------------------------------- KnockoffNets


@dataclass
class KnockoffConfig(ExtractionConfig):
    """Settings of :class:`KnockoffNets` (each once; the transfer set is an input, not a setting)."""

    sampling: str = "random"  # "random" (uniform, no repeats) | "adaptive" (gradient bandit over groups)
    hard_labels: bool = False  # train on one-hot argmax of the answers (required for a top-1 victim)
    defense_aware: bool = False  # invert the victim's defense on each answer before fitting (.defense_aware)
    inversion_steps: int = 300  # defense-aware: Adam steps recovering the clean probabilities of each answer
    inversion_lr: float = 0.05  # defense-aware: their step size (on the logits of the recovered probabilities)
    batch_size: int = 64  # images per query round and per clone training step
    epochs: int = 10  # passes of the clone over all answered queries after querying
    optimizer: str = "sgd"  # the clone's optimizer: "sgd" (with momentum) | "adam"
    lr: float = 0.01  # the clone's learning rate (constant)
    momentum: float = 0.5  # SGD momentum (unused by adam)
    weight_decay: float = 5e-4  # the clone's L2 weight decay
    num_groups: int = 10  # adaptive sampling: k-means groups of the transfer set when no groups are given
    bandit_lr: float = 0.1  # adaptive sampling: step size of the gradient bandit

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("sampling", self.sampling, ("random", "adaptive"))
        check_bool("hard_labels", self.hard_labels)
        check_bool("defense_aware", self.defense_aware)
        check_int("inversion_steps", self.inversion_steps, 1)
        check_positive("inversion_lr", self.inversion_lr)
        check_int("batch_size", self.batch_size, 1)
        check_int("epochs", self.epochs, 0)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_positive("lr", self.lr)
        check_non_negative("momentum", self.momentum)
        check_non_negative("weight_decay", self.weight_decay)
        check_int("num_groups", self.num_groups, 1)
        check_positive("bandit_lr", self.bandit_lr)


@ATTACKS.register("knockoff")
@register_extraction("knockoff")
class KnockoffNets:
    """KnockoffNets: query a transfer set, fit a clone on the answers (see the module docstring).

    ``KnockoffNets(victim, clone, config=None, *, transfer_set=None, transfer_groups=None, **overrides)``

    Args:
        victim: the :class:`Victim` to query.
        clone: the attacker's model (trained in place, returned in the result).
        config: a :class:`KnockoffConfig`, a mapping of its settings, or None (defaults); ``overrides``
            replace single settings (``KnockoffNets(victim, clone, epochs=3, seed=0)``).
        transfer_set: the attacker's images (float [N, C, H, W] in [0, 1]; see :func:`prepare_transfer_set`);
            may instead be given to :meth:`run`.
        transfer_groups: [N] group ids for adaptive sampling (e.g. coarse labels); default k-means groups.
    """

    name = "knockoff"
    phase = "knockoff"
    config_class = KnockoffConfig
    inputs = ("transfer_set", "transfer_groups")

    def __init__(
        self,
        victim: Victim,
        clone: nn.Module,
        config: KnockoffConfig | dict | None = None,
        *,
        transfer_set: Tensor | None = None,
        transfer_groups: Tensor | None = None,
        **overrides: Any,
    ):
        self.config = cfg = self.config_class.build(config, **overrides)
        if victim.output == "top1" and not cfg.hard_labels:
            raise ConfigError(
                "the victim answers top-1 labels only (output='top1'): KnockoffNets needs hard_labels=True"
            )
        self.victim = victim
        self.clone = clone
        self.transfer_set = transfer_set
        self.transfer_groups = transfer_groups
        self.optimizer = build_optimizer(clone.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
        self.rng = seeded_generator(cfg.seed)
        self._answer, self._defense_note = (
            defense_aware_answer(victim) if cfg.defense_aware else (None, "off")
        )

    # ------------------------------------------------------------------ select -> query -> fit

    def select(self, num_images: int, num_queries: int) -> Tensor:
        """Random sampling: ``num_queries`` distinct indices into a transfer set of ``num_images``."""
        return torch.randperm(num_images, generator=self.rng)[:num_queries]

    def query(self, x: Tensor) -> Tensor | None:
        """The victim's answers for ``x`` as training targets, or None when the budget is gone."""
        try:
            answers = self.victim.query(x, phase=self.phase)
        except QueryBudgetExhausted:
            return None
        return self._targets(answers)

    def fit(
        self,
        x: Tensor,
        y: Tensor,
        *,
        eval_data: tuple[Tensor, Tensor] | None = None,
        queries: int = 0,
        eval_every: int = 1,
    ) -> list[tuple[int, float | None]]:
        """Train the clone for ``epochs`` on (x, y); one history point every ``eval_every`` epochs and at the end."""
        history: list[tuple[int, float | None]] = []
        epochs = self.config.epochs

        def record(epoch: int) -> None:
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                history.append((queries, self._evaluate(eval_data)))

        fit_clone(
            self.clone,
            x,
            y,
            epochs=epochs,
            batch_size=self.config.batch_size,
            optimizer=self.optimizer,
            generator=self.rng,
            on_epoch=record,
            progress=self.config.progress,
        )
        return history

    def run(
        self,
        first: int | Tensor | None = None,
        /,
        eval_data: tuple[Tensor, Tensor] | None = None,
        eval_every: int | None = None,
        *,
        num_queries: int | None = None,
        transfer_set: Tensor | None = None,
        transfer_groups: Tensor | None = None,
        image_shape: tuple[int, int, int] | None = None,
    ) -> ExtractionResult:
        """Select ``num_queries`` transfer images, query the victim, fit the clone.

        The family's call is ``run(num_queries, eval_data=None, eval_every=None)``; the transfer set (and
        groups) come from the constructor, or from ``transfer_set=`` here (the older call shape
        ``run(transfer_set, num_queries=...)`` still works). ``num_queries`` defaults to
        ``min(victim.remaining, len(transfer_set))``; each image is queried at most once. ``image_shape``
        converts the transfer set with :func:`prepare_transfer_set`. ``eval_data=(x_test, y_test)`` adds
        clone accuracy to the history (after querying, then every ``eval_every`` epochs of the fit, default
        1, and at its end). If the victim's budget runs out first, the clone is fitted on what was answered
        and ``stopped_early`` is True.
        """
        if isinstance(first, Tensor):
            if transfer_set is not None:
                raise ConfigError("the transfer set was given twice (as the first argument and as transfer_set=)")
            transfer_set = first
        elif first is not None:
            if num_queries is not None:
                raise ConfigError("num_queries was given twice (as the first argument and as num_queries=)")
            num_queries = first
        transfer_set = self.transfer_set if transfer_set is None else transfer_set
        transfer_groups = self.transfer_groups if transfer_groups is None else transfer_groups
        if transfer_set is None:
            raise ConfigError(
                "KnockoffNets needs a transfer set: KnockoffNets(victim, clone, transfer_set=images) or "
                "run(num_queries, transfer_set=images)"
            )
        eval_every = 1 if eval_every is None else check_int("eval_every", eval_every, 1)
        if image_shape is not None:
            transfer_set = prepare_transfer_set(transfer_set, image_shape)
        n_images = transfer_set.shape[0]
        if num_queries is None:
            num_queries = min(self.victim.remaining, n_images)
        check_int("num_queries", num_queries, 1)
        if num_queries > n_images:
            raise ConfigError(
                f"num_queries={num_queries} exceeds the transfer set ({n_images} images); "
                "KnockoffNets queries each image once: use a larger transfer set or fewer queries"
            )
        if transfer_groups is not None and self.config.sampling != "adaptive":
            raise ConfigError("transfer_groups are used by sampling='adaptive' only")
        used_before, ledger_before = self.victim.used, self.victim.ledger

        if self.config.sampling == "random":
            x, y, rounds, info = self._query_random(transfer_set, num_queries)
        else:
            x, y, rounds, info = self._query_adaptive(transfer_set, num_queries, transfer_groups)
        spent = self.victim.used - used_before
        history = [(spent, self._evaluate(eval_data))]
        if x.shape[0] > 0:
            history += self.fit(x, y, eval_data=eval_data, queries=spent, eval_every=eval_every)
        info.update(
            num_queries_planned=num_queries,
            sampling=self.config.sampling,
            hard_labels=self.config.hard_labels,
            defense_aware=self._defense_note,
        )
        return ExtractionResult(
            clone=self.clone,
            queries_used=spent,
            iterations=rounds,
            stopped_early=x.shape[0] < num_queries,
            history=history,
            ledger=ledger_delta(ledger_before, self.victim.ledger),
            info=info,
        )

    # ------------------------------------------------------------------ internals

    def _targets(self, answers: Tensor) -> Tensor:
        """Training targets from answers: the recovered clean probabilities when defense-aware, then one-hot
        of the argmax with ``hard_labels``."""
        if self._answer is not None:
            answers = recover_probabilities(
                answers, self._answer, self.config.inversion_steps, self.config.inversion_lr
            )
        if self.config.hard_labels:
            return torch.zeros_like(answers).scatter_(1, answers.argmax(dim=1, keepdim=True), 1.0)
        return answers

    def _evaluate(self, eval_data: tuple[Tensor, Tensor] | None) -> float | None:
        return None if eval_data is None else clone_accuracy(self.clone, *eval_data)

    def _round_size(self, wanted: int) -> int:
        return min(self.config.batch_size, wanted, self.victim.remaining)

    def _query_rounds(
        self, transfer_set: Tensor, num_queries: int, pick, learn=None
    ) -> tuple[Tensor, Tensor, int]:
        """Query the victim in rounds of at most ``batch_size`` until ``num_queries`` are answered (or the
        victim's budget ends): ``pick(size) -> images`` chooses each round, ``learn(images, answers)`` (if
        given) sees each answered round. Returns all images, all answers and the number of rounds."""
        xs, ys, done, rounds = [], [], 0, 0
        with tqdm(
            total=num_queries, desc=f"{self.phase} queries", disable=not self.config.progress, leave=False
        ) as bar:
            while done < num_queries:
                size = self._round_size(num_queries - done)
                if size == 0:
                    break
                x = pick(size)
                y = self.query(x)
                if y is None:
                    break
                if learn is not None:
                    learn(x, y)
                xs.append(x)
                ys.append(y)
                done += size
                rounds += 1
                bar.update(size)
        x, y = self._stack(xs, ys, transfer_set)
        return x, y, rounds

    def _query_random(self, transfer_set: Tensor, num_queries: int) -> tuple[Tensor, Tensor, int, dict]:
        order = self.select(transfer_set.shape[0], num_queries).to(transfer_set.device)
        start = [0]

        def pick(size: int) -> Tensor:
            x = transfer_set[order[start[0] : start[0] + size]]
            start[0] += size
            return x

        x, y, rounds = self._query_rounds(transfer_set, num_queries, pick)
        return x, y, rounds, {}

    def _stack(self, xs: list[Tensor], ys: list[Tensor], transfer_set: Tensor) -> tuple[Tensor, Tensor]:
        if not xs:
            return transfer_set[:0], torch.empty(0, 0)
        return torch.cat(xs), torch.cat(ys)

    def _query_adaptive(
        self, transfer_set: Tensor, num_queries: int, transfer_groups: Tensor | None
    ) -> tuple[Tensor, Tensor, int, dict]:
        n_images = transfer_set.shape[0]
        if transfer_groups is None:
            groups = kmeans_groups(transfer_set, self.config.num_groups, generator=self.rng)
        else:
            if transfer_groups.shape != (n_images,):
                raise ConfigError(
                    f"transfer_groups must have shape ({n_images},), got {tuple(transfer_groups.shape)}"
                )
            groups = torch.unique(transfer_groups.cpu(), return_inverse=True)[1]
        groups = groups.cpu()
        num_groups = int(groups.max()) + 1
        # per group: its images in a random order, consumed from the front
        shuffled = torch.randperm(n_images, generator=self.rng)
        pools = [shuffled[groups[shuffled] == g] for g in range(num_groups)]
        taken = torch.zeros(num_groups, dtype=torch.long)
        device = module_device(self.clone)

        state = {"preference": torch.zeros(num_groups), "reward_sum": 0.0, "reward_count": 0, "answer_mean": None}

        def pick(size: int) -> Tensor:
            available = torch.tensor([len(p) for p in pools]) - taken
            state["policy"] = self._policy(state["preference"], available)
            index, state["actions"] = self._draw(pools, taken, available, state["preference"], size)
            return transfer_set[index.to(transfer_set.device)]

        def learn(x: Tensor, y: Tensor) -> None:
            # rewards use the clone's prediction before it trains on this round
            with torch.no_grad(), eval_mode(self.clone):
                logits = self.clone(x.to(device)).cpu()
            y_cpu = y.detach().cpu()
            if state["answer_mean"] is None:
                state["answer_mean"] = torch.full_like(y_cpu[0], 1.0 / y_cpu.shape[1])
            top2 = y_cpu.topk(2, dim=1).values
            certainty = top2[:, 0] - top2[:, 1]
            diversity = (y_cpu - state["answer_mean"]).clamp_min(0).sum(dim=1)
            ce = -(y_cpu * F.log_softmax(logits, dim=1)).sum(dim=1)
            reward = (certainty + diversity + (1 - torch.exp(-ce))) / 3
            baseline = state["reward_sum"] / state["reward_count"] if state["reward_count"] else 0.0
            state["preference"] = gradient_bandit_step(
                state["preference"], state["policy"], state["actions"], reward, baseline, self.config.bandit_lr
            )
            state["reward_sum"] += reward.sum().item()
            state["reward_count"] += reward.numel()
            state["answer_mean"] = 0.9 * state["answer_mean"] + 0.1 * y_cpu.mean(dim=0)
            # online step of the clone on this round (the paper trains the knockoff as it queries)
            if x.shape[0] > 1:
                self.clone.train()
                loss = soft_cross_entropy(self.clone(x.to(device)), y.to(device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

        x, y, rounds = self._query_rounds(transfer_set, num_queries, pick, learn)
        preference = state["preference"]
        left = torch.tensor([len(p) for p in pools]) - taken
        final_policy = (
            self._policy(preference, left) if (left > 0).any() else torch.softmax(preference, dim=0)
        )
        info = {"num_groups": num_groups, "policy": [round(v, 6) for v in final_policy.tolist()]}
        return x, y, rounds, info

    @staticmethod
    def _policy(preference: Tensor, available: Tensor) -> Tensor:
        return torch.softmax(preference.masked_fill(available <= 0, float("-inf")), dim=0)

    def _draw(
        self, pools: list[Tensor], taken: Tensor, available: Tensor, preference: Tensor, size: int
    ) -> tuple[Tensor, Tensor]:
        """Draw ``size`` unused images: a group from the policy per image, then the group's next image."""
        index, actions = [], []
        available = available.clone()
        need = size
        while need > 0:
            draws = torch.multinomial(
                self._policy(preference, available), need, replacement=True, generator=self.rng
            )
            counts = torch.bincount(draws, minlength=len(pools)).minimum(available)
            for g in counts.nonzero().flatten().tolist():
                c = int(counts[g])
                start = int(taken[g])
                index.append(pools[g][start : start + c])
                actions.append(torch.full((c,), g, dtype=torch.long))
                taken[g] += c
                available[g] -= c
            need -= int(counts.sum())
        return torch.cat(index), torch.cat(actions)


@dataclass
class DefenseAwareKnockoffConfig(KnockoffConfig):
    """:class:`KnockoffConfig` with ``defense_aware=True`` by default."""

    defense_aware: bool = True


@register_extraction("knockoff-adaptive")
class DefenseAwareKnockoffNets(KnockoffNets):
    """KnockoffNets that fits its clone through the victim's defense (:mod:`.defense_aware`): the registered
    ``knockoff-adaptive``, i.e. ``KnockoffNets`` with ``defense_aware=True`` by default."""

    name = "knockoff-adaptive"
    config_class = DefenseAwareKnockoffConfig


# --------------------------------------------------------------------------- the noise floor


def _image_shape(name: str, value: Any) -> tuple[int, int, int]:
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ConfigError(f"{name} must be (C, H, W), got {value!r}")
    return tuple(check_int(name, v, 1) for v in value)  # type: ignore[return-value]


def victim_image_shape(victim: Victim, given: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``given``, else the victim model's ``input_shape`` (set by qrobust's model builders)."""
    if given is not None:
        return _image_shape("image_shape", given)
    shape = getattr(victim.model, "input_shape", None)
    if shape is None:
        raise ConfigError(
            "image_shape is needed: give image_shape=(C, H, W) (the victim's model does not say its input_shape)"
        )
    return _image_shape("the victim model's input_shape", tuple(shape))


@dataclass
class NoiseConfig(KnockoffConfig):
    """:class:`KnockoffConfig` plus the shape of the noise images (sampling is always random)."""

    image_shape: tuple[int, int, int] | None = None  # (C, H, W) of the noise; None = the victim model's input_shape

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampling != "random":
            raise ConfigError("the noise floor samples at random: leave sampling='random'")
        if self.image_shape is not None:
            self.image_shape = _image_shape("image_shape", self.image_shape)


@ATTACKS.register("noise")
@register_extraction("noise")
class RandomNoise(KnockoffNets):
    """The floor: KnockoffNets' fit on queries of uniform noise images ``x ~ U[0, 1]^(C x H x W)``.

    A clone trained on as many noise queries as an attack spent shows what the queries are worth
    without any knowledge of the data; an attack that does not beat it extracted nothing useful.
    ``RandomNoise(victim, clone, config=None, **overrides)`` with a :class:`NoiseConfig`.
    """

    name = "noise"
    phase = "noise"
    config_class = NoiseConfig
    inputs = ()

    def __init__(self, victim: Victim, clone: nn.Module, config: NoiseConfig | dict | None = None, **overrides: Any):
        super().__init__(victim, clone, config, **overrides)
        self.image_shape = victim_image_shape(victim, self.config.image_shape)

    def run(  # type: ignore[override]
        self,
        num_queries: int | None = None,
        eval_data: tuple[Tensor, Tensor] | None = None,
        eval_every: int | None = None,
    ) -> ExtractionResult:
        """Query ``num_queries`` (default: ``victim.remaining``) noise images and fit the clone."""
        num_queries = self.victim.remaining if num_queries is None else num_queries
        check_int("num_queries", num_queries, 1)
        noise = torch.rand(num_queries, *self.image_shape, generator=self.rng)
        return super().run(num_queries, eval_data, eval_every, transfer_set=noise)


def random_noise_floor(
    victim: Victim,
    clone: nn.Module,
    *,
    num_queries: int,
    image_shape: tuple[int, int, int],
    eval_data: tuple[Tensor, Tensor] | None = None,
    **fit: Any,
) -> ExtractionResult:
    """Clone trained on ``num_queries`` uniform-noise queries (see :class:`RandomNoise`).

    ``fit`` takes :class:`NoiseConfig` settings (hard_labels, batch_size, epochs, lr, seed, ...).
    """
    return RandomNoise(victim, clone, image_shape=image_shape, **fit).run(num_queries, eval_data)
