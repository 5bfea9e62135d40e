"""The victim of an extraction attack: a deployed model behind a query interface with a budget.

Threat model (docs/DESIGN, "Extraction"): the attacker sends images and receives the victim's
*defended* output for each one; nothing else. ``Victim`` = model + output defense + output format +
query ledger, like knockoffnets' ``Blackbox`` (tribhuvanesh/knockoffnets, knockoff/victim/blackbox.py):

* every image the victim answers costs one query, whatever the attack does with it (zeroth-order
  probes of DFME/MAZE included);
* the defense is applied to *every* answer (some reference code defends only part of the queries);
* a batch that would exceed the budget is refused as a whole with :class:`QueryBudgetExhausted`, and
  nothing of it is answered or counted; ``remaining`` tells the attacker how much it may still ask;
* a ledger counts the queries per phase (e.g. ``{"dfme_generator": ..., "dfme_clone": ...}``);
* an independent count (:class:`CountingModule` around the answering model and around the defense)
  counts the rows that really reached the model's forward and the defense while answering queries, so
  "rows computed == ledger == queries the attack reports" is a check that can fail
  (:attr:`Victim.independent_counts`).

Answer for a batch x, with ``f`` the model (logits), ``D`` the defense and ``O`` the output format::

    answer(x) = O(D(softmax(f(x))))     O = identity ("probs") | one-hot argmax ("top1")
                                           | top-k renormalised ("topk")

**The deployed artefact.** An 8-bit QAT twin is a simulation of an int8 model; what a service deploys
is the int8 model itself. With ``int8="auto"`` (default) a victim whose model is an 8-bit QAT twin
answers from the real int8 model (:func:`qrobust.quant.deploy.export_int8`, exported once per state
of the twin's weights and cached), which agrees with the twin on >= 99.9% of top-1 answers and runs
~8-10x faster than its fake-quantized forward on x86 CPUs. Anything else (a float model, another bit
width, ``float_logits``, a model on a GPU, a module the exporter does not know) answers from the model
itself; :attr:`Victim.answers_from` says which, :attr:`Victim.int8_fallback` why not int8.
``int8=True`` insists (a :class:`ConfigError` when export is impossible), ``int8=False`` never exports.

The defender's own evaluation (:meth:`Victim.accuracy`, :meth:`Victim.labels`,
:meth:`Victim.mean_l1`, :meth:`Victim.calibration`) goes through the same answer path but is *not* a
query and costs no budget: it is the defender measuring its deployed service on its own test set.
Attacks must only call :meth:`Victim.query`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.checks import check_int
from qrobust.defenses.output import make_defense, mean_l1, top_k
from qrobust.errors import ConfigError, QrobustError
from qrobust.metrics import expected_calibration_error, nll
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


# --------------------------------------------------------------------------- independent counting


class CountingModule(nn.Module):
    """``module`` unchanged, plus ``rows``: how many rows (first dimension of the first argument) reached
    its ``forward``. An independent witness of how many inputs a model really computed."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.rows = 0

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.rows += int(x.shape[0])
        return self.module(x, *args, **kwargs)


class CountingCallable:
    """A callable (e.g. an output defense) unchanged, plus ``rows``: the rows of every batch it saw."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn
        self.rows = 0

    def __call__(self, p: Tensor) -> Tensor:
        self.rows += int(p.shape[0])
        return self.fn(p)

    def __repr__(self) -> str:
        return repr(self.fn)


# --------------------------------------------------------------------------- the int8 artefact

# twin -> (fingerprint of its weights and buffers, int8 model): one export per state of a twin
_INT8_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is replaced or modified in place."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((t.data_ptr(), t._version) for t in tensors)  # _version: torch's in-place counter


def int8_blocker(model: nn.Module) -> str | None:
    """Why ``model`` is not an 8-bit QAT twin that exports to int8 (None when it is one)."""
    from qrobust.quant.fake import ActQuant, QuantConv2d, QuantLinear

    config = getattr(model, "quant_config", None)
    if config is None:
        return "not a QAT model (no quant_config)"
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear, ActQuant))]
    if any(not m.enabled for m in layers):
        return "fake quantization is switched off"
    widths = sorted({m.bits for m in layers})
    if widths != [8]:
        return f"not 8-bit (bit widths {widths})"
    if config.float_logits:
        return "float_logits=True (torch's int8 modules quantize the logits)"
    if module_device(model).type != "cpu":
        return f"the model is on {module_device(model)} (int8 kernels run on the CPU)"
    return None


def deployed_int8(model: nn.Module) -> nn.Module:
    """The int8 model of an 8-bit QAT twin, exported once per state of its weights (cached)."""
    from qrobust.quant.deploy import export_int8

    blocker = int8_blocker(model)
    if blocker is not None:
        raise ConfigError(f"cannot answer from an int8 model: {blocker}; pass int8='auto' or int8=False")
    key = _fingerprint(model)
    cached = _INT8_CACHE.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    with eval_mode(model):  # export reads eval-mode ranges; every submodule's flag is restored after
        int8 = export_int8(model)
    _INT8_CACHE[model] = (key, int8)
    return int8


# --------------------------------------------------------------------------- the victim


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
        int8: ``"auto"`` answers from the real int8 model when ``model`` is an 8-bit QAT twin that
            exports (see the module docstring), else from ``model``; ``True`` requires the int8 model;
            ``False`` always answers from ``model``. The int8 model is exported when the victim is built:
            build the victim after training the twin.
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
        int8: bool | str = "auto",
    ):
        if output not in OUTPUT_MODES:
            raise ConfigError(f"output must be one of {', '.join(OUTPUT_MODES)}, got '{output}'")
        if output == "topk":
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ConfigError(f"output='topk' needs an integer k >= 1, got k={k!r}")
        elif k is not None:
            raise ConfigError(f"k is only used with output='topk' (output is '{output}')")
        check_int("budget", budget, 0)
        check_int("batch_size", batch_size, 1)
        if not (int8 is True or int8 is False or int8 == "auto"):
            raise ConfigError(f"int8 must be True, False or 'auto', got {int8!r}")
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
        self.int8 = int8
        self.int8_fallback: str | None = None
        answering = model
        if int8 is False:
            self.int8_fallback = "int8=False"
        else:
            blocker = int8_blocker(model)
            if blocker is None:
                try:
                    answering = deployed_int8(model)
                except ConfigError as err:
                    blocker = f"export failed: {err}"
            if blocker is not None:
                if int8 is True:
                    raise ConfigError(
                        f"int8=True but this model cannot answer as int8: {blocker}; use int8='auto' to fall "
                        "back to the model itself"
                    )
                self.int8_fallback = blocker
        self.answers_from = "int8" if answering is not model else "model"
        # the query path and the evaluation path each count the rows they compute, independently of the ledger
        self._query_model = CountingModule(answering)
        self._query_defense = CountingCallable(defense) if defense is not None else None
        self._eval_model = CountingModule(answering)
        self._ledger: dict[str, int] = {}
        self._answered_rows = 0  # rows through the answer-shaping step of the query path (None defense too)

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"Victim({type(self.model).__name__}, defense={self.defense!r}, output='{self.output}'{k}, "
            f"answers_from='{self.answers_from}', used={self.used}/{self.budget})"
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

    @property
    def independent_counts(self) -> dict[str, int]:
        """Rows computed while answering queries, counted where they are computed, not from the ledger.

        ``model_rows``: rows that reached the answering model's forward (the int8 model or ``model``);
        ``defense_rows``: rows the defense saw (the answer-shaping step when there is no defense). After an
        attack both equal ``used`` and the attack's reported ``queries_used`` (see :meth:`counts_agree`).
        The defender's own evaluation is counted apart (``evaluation_rows``).
        """
        defense_rows = self._query_defense.rows if self._query_defense is not None else self._answered_rows
        return {
            "model_rows": self._query_model.rows,
            "defense_rows": defense_rows,
            "evaluation_rows": self._eval_model.rows,
        }

    def counts_agree(self, reported: int) -> bool:
        """``rows computed by the model == rows the defense saw == ledger == reported`` (all queries so far)."""
        counts = self.independent_counts
        return counts["model_rows"] == counts["defense_rows"] == self.used == reported

    # ------------------------------------------------------------------ answers

    def query(self, x: Tensor, phase: str = "knockoff") -> Tensor:
        """Answer a batch of images with defended outputs; each image costs one query.

        Raises :class:`QueryBudgetExhausted` (answering and counting nothing) when ``len(x)`` exceeds
        :attr:`remaining`. Returns a [B, K] tensor on ``x``'s device.
        """
        n = int(x.shape[0])
        if n > self.remaining:
            raise QueryBudgetExhausted(n, self.remaining, self.budget, phase)
        if n == 0:
            raise ConfigError("empty batch: query at least one image")
        answers = self._shape(self._clean_probs(x, self._query_model), self._query_defense).detach()
        self._answered_rows += n
        self._ledger[phase] = self._ledger.get(phase, 0) + n
        return answers

    def _clean_probs(self, x: Tensor, model: nn.Module) -> Tensor:
        device = self.device if self.answers_from == "model" else torch.device("cpu")
        with eval_mode(model), torch.no_grad():  # eval for our forwards only: flags restored
            logits = torch.cat([model(chunk.to(device)) for chunk in x.split(self.batch_size)])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # probabilities of half-precision models in float32
        return F.softmax(logits, dim=1).to(x.device)

    def answer_from_probs(self, p: Tensor, defense: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``O(D(p))``: the answer the victim would give for clean probabilities ``p`` (no query, no count).

        Differentiable wherever the defense and the output format are (an adaptive attacker that knows the
        defense uses it on its clone's probabilities; see KnockoffNets' ``defense_aware``).
        """
        defense = self.defense if defense is None else defense
        if defense is not None:
            p = defense(p)
        if self.output == "top1":
            return torch.zeros_like(p).scatter_(1, p.argmax(dim=1, keepdim=True), 1.0)
        if self.output == "topk":
            return top_k(p, self.k)
        return p

    def _shape(self, p: Tensor, defense: Callable[[Tensor], Tensor] | None) -> Tensor:
        return self.answer_from_probs(p, defense)

    def _evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(clean probabilities, answers) for the defender's evaluation: not a query, not in the ledger."""
        if x.shape[0] == 0:
            raise ConfigError("empty batch: evaluate at least one image")
        clean = self._clean_probs(x, self._eval_model)
        return clean, self._shape(clean, self.defense).detach()

    # ------------------------------------------------------------------ the defender's own evaluation

    def labels(self, x: Tensor) -> Tensor:
        """Argmax of the defended answers. Evaluation only: not a query, costs no budget."""
        return self._evaluate(x)[1].argmax(dim=1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Defender accuracy: share of ``x`` whose defended answer's argmax is ``y``. Not a query."""
        return (self.labels(x) == y.to(x.device)).float().mean().item()

    def mean_l1(self, x: Tensor) -> float:
        """Mean l1 distance between clean probabilities and the answers served. Not a query."""
        clean, answers = self._evaluate(x)
        return mean_l1(clean, answers)

    def calibration(self, x: Tensor, y: Tensor, bins: int = 15) -> dict[str, float]:
        """What the defended answers cost a user who needs calibrated probabilities. Not a query.

        ``{"ece": expected calibration error (``bins`` equal-width confidence bins, Guo et al. 2017),
        "nll": mean negative log-likelihood of ``y``}`` of the answers served (defense and output format
        applied), see :func:`qrobust.metrics.expected_calibration_error` and :func:`qrobust.metrics.nll`.
        """
        answers = self._evaluate(x)[1]
        return {"ece": expected_calibration_error(answers, y, bins=bins), "nll": nll(answers, y)}
