"""The victim of an extraction attack: a deployed model behind a query interface with a budget.

Threat model (docs/DESIGN, "Extraction"): the attacker sends images and receives the victim's
*defended* output for each one; nothing else. ``Victim`` = model + output defense + output format +
query ledger, like knockoffnets' ``Blackbox`` (tribhuvanesh/knockoffnets, knockoff/victim/blackbox.py):

* every image the victim answers costs one query, whatever the attack does with it (zeroth-order
  probes of DFME/MAZE included);
* the defense is applied to *every* answer (some reference code defends only part of the queries);
* a batch that would exceed the budget is refused as a whole with :class:`QueryBudgetExhausted`, and
  nothing of it is answered or counted; ``remaining`` tells the attacker how much it may still ask;
* a ledger counts the queries per phase (e.g. ``{"dfme_generator": ..., "dfme_clone": ...}``).

Answer for a batch x, with ``f`` the model (logits), ``D`` the defense and ``O`` the output format::

    answer(x) = O(D(softmax(f(x))))     O = identity ("probs") | one-hot argmax ("top1")
                                           | top-k renormalised ("topk")

The defender's own evaluation (:meth:`Victim.accuracy`, :meth:`Victim.labels`,
:meth:`Victim.mean_l1`) goes through the same answer path but is *not* a query and costs no budget:
it is the defender measuring its deployed service on its own test set. Attacks must only call
:meth:`Victim.query`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.defenses.output import make_defense, mean_l1, top_k
from qrobust.errors import ConfigError, QrobustError
from qrobust.utils import eval_mode, module_device

OUTPUT_MODES = ("probs", "top1", "topk")


class QueryBudgetExhausted(QrobustError):
    """The victim refused a batch because it would exceed the query budget; nothing was answered."""

    def __init__(self, requested: int, remaining: int, budget: int, phase: str):
        self.requested = requested
        self.remaining = remaining
        self.budget = budget
        self.phase = phase
        super().__init__(
            f"query budget exhausted: phase '{phase}' asked for {requested} queries but only {remaining} "
            f"of {budget} remain; nothing of this batch was answered. Ask for at most `victim.remaining` "
            f"queries or give the victim a larger budget."
        )


class Victim:
    """A model behind a budgeted query interface that answers with defended outputs.

    Args:
        model: classifier returning logits for images in [0, 1] (normalisation inside ``forward``).
            Every answer is computed in eval mode without gradients; the model's own train/eval flags
            are switched only for those forwards and restored after each (the caller's model is left
            as it was found; the victim does not move it or change its weights).
        defense: ``None`` (clean probabilities), a defense name without parameters ("none", "label"),
            or a callable on a probability batch, e.g. ``make_defense("rs", beta=0.5, gamma=0.2)``.
        output: "probs" (K probabilities), "top1" (one-hot label), "topk" (top-``k`` renormalised).
        k: the k of ``output="topk"`` (only then).
        budget: number of queries (images) the victim will answer in total.
        batch_size: images per forward pass inside one query call (memory only; no effect on counts).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        defense: str | Callable[[Tensor], Tensor] | None = None,
        output: str = "probs",
        k: int | None = None,
        budget: int,
        batch_size: int = 512,
    ):
        if output not in OUTPUT_MODES:
            raise ConfigError(f"output must be one of {', '.join(OUTPUT_MODES)}, got '{output}'")
        if output == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"output='topk' needs an integer k >= 1, got k={k!r}")
        elif k is not None:
            raise ConfigError(f"k is only used with output='topk' (output is '{output}')")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ConfigError(f"budget must be an integer >= 0, got {budget!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if isinstance(defense, str):
            defense = make_defense(defense)
        if defense is not None and not callable(defense):
            raise ConfigError(f"defense must be None, a name or a callable, got {type(defense).__name__}")
        self.model = model
        self.defense = defense
        self.output = output
        self.k = k
        self.budget = budget
        self.batch_size = batch_size
        self._ledger: dict[str, int] = {}

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"Victim({type(self.model).__name__}, defense={self.defense!r}, output='{self.output}'{k}, "
            f"used={self.used}/{self.budget})"
        )

    # ------------------------------------------------------------------ budget

    @property
    def used(self) -> int:
        """Queries answered so far (all phases)."""
        return sum(self._ledger.values())

    @property
    def remaining(self) -> int:
        """Queries the victim will still answer."""
        return self.budget - self.used

    @property
    def ledger(self) -> dict[str, int]:
        """A copy of ``{phase: queries answered}``."""
        return dict(self._ledger)

    @property
    def device(self) -> torch.device:
        return module_device(self.model)

    # ------------------------------------------------------------------ answers

    def query(self, x: Tensor, phase: str = "knockoff") -> Tensor:
        """Answer a batch of images with defended outputs; each image costs one query.

        Raises :class:`QueryBudgetExhausted` (answering and counting nothing) when ``len(x)`` exceeds
        :attr:`remaining`. Returns a [B, K] tensor on ``x``'s device.
        """
        n = int(x.shape[0])
        if n > self.remaining:
            raise QueryBudgetExhausted(n, self.remaining, self.budget, phase)
        answers = self._answer(x)
        self._ledger[phase] = self._ledger.get(phase, 0) + n
        return answers

    def _clean_probs(self, x: Tensor) -> Tensor:
        device = self.device
        with eval_mode(self.model), torch.no_grad():  # eval for our forwards only: flags restored
            logits = torch.cat([self.model(chunk.to(device)) for chunk in x.split(self.batch_size)])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # probabilities of half-precision models in float32
        return F.softmax(logits, dim=1).to(x.device)

    def _shape(self, p: Tensor) -> Tensor:
        if self.defense is not None:
            p = self.defense(p)
        if self.output == "top1":
            return torch.zeros_like(p).scatter_(1, p.argmax(dim=1, keepdim=True), 1.0)
        if self.output == "topk":
            return top_k(p, self.k)
        return p

    def _answer(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            raise ConfigError("empty batch: query at least one image")
        return self._shape(self._clean_probs(x)).detach()

    # ------------------------------------------------------------------ the defender's own evaluation

    def labels(self, x: Tensor) -> Tensor:
        """Argmax of the defended answers. Evaluation only: not a query, costs no budget."""
        return self._answer(x).argmax(dim=1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Defender accuracy: share of ``x`` whose defended answer's argmax is ``y``. Not a query."""
        return (self.labels(x) == y.to(x.device)).float().mean().item()

    def mean_l1(self, x: Tensor) -> float:
        """Mean l1 distance between clean probabilities and the answers served. Not a query."""
        clean = self._clean_probs(x)
        return mean_l1(clean, self._shape(clean))
