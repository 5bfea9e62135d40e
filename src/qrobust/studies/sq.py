"""The stochastic-quantizer white-box study: ``qrobust run sq [--preset quick|full|paper]``.

Paper: A. Farkya, A. Raghavan, A. Ziskind, "Improving the Robustness of Quantized Deep Neural Networks to
White-Box Attacks using Stochastic Quantization and Information-Theoretic Ensemble Training",
arXiv:2312.00105 (2023). Claim: > 50% accuracy under PGD(5/255) on CIFAR-10 without adversarial
training, from a differentiable stochastic quantizer (SQ) and an MI-regularised ensemble objective.

Threat model (DESIGN.md, 3): white-box L-inf attacks on inputs in [0, 1]; the attacker knows the weights
and the SQ's distribution, not its draws, so it may average gradients over draws (EOT, Athalye et al.
2018). The defended model is the deployed ensemble ``f(x) = log mean_{n<=N} softmax(f_n(x))`` (N SQ draws,
:class:`~qrobust.quant.stochastic.EnsembleSQ`); it stays random at inference.

Models (per seed, each its own resumable run folder ``seed-<s>/models/<name>``):

* ``fp32``: the float network, cross-entropy;
* ``qat<b>``: deterministic QAT fine-tuned from it, ``b = ceil(log2 K)`` bits (the SQ's resolution);
* ``sq``: SQs at the input and after ``sq.after`` layers, fine-tuned from fp32 with the ensemble loss and
  ``beta = 0`` (no MI term);
* ``sq-mi``: the same with the MI ensemble objective (:class:`~qrobust.train.sq_objective.MIEnsembleLoss`)::

      L = mean_n CE(f_n(x), y) - beta * [H(T) - H(T|X)] + w * sum_SQ R_spacing

  with ``H(T) = H(mean_n p_n)``, ``H(T|X) = mean_n H(p_n)`` over the N draws of one image.

Each SQ's bins start uniform over a range calibrated on the trained float model's activations at that
insertion point (``[min(0, q_lo), q_hi]``, ``q`` the ``sq.percentile``-th percentiles; the input SQ uses
the pixel range [0, 1]).

Evaluation (all on the same held-out test images, attacks in one batched pass per step):

* robust accuracy vs eps for FGSM, PGD (one gradient of the deployed ensemble per step), EOT-PGD
  (``attack.eot`` ensemble draws per step), a transfer attack (PGD made on the float model, a
  black-box check) and BPDA (Athalye et al. 2018): PGD on the model's *float twin* (the same weights
  with every fake quantizer off and every SQ replaced by the identity), evaluated on the model itself.
  Quantizers give gradients only through straight-through estimates; if BPDA beats PGD on a quantized
  model, its PGD number was inflated by gradient masking and BPDA's is the honest one. An input counts as robust only if it is classified correctly, clean and attacked,
  on every one of ``attack.draws`` independent evaluations (the definition of
  :func:`~qrobust.attacks.whitebox.robust_accuracy`; here every test image is attacked once and the
  adversarial inputs are reused for the AIP and the detector);
* the adversarial information plane (:func:`~qrobust.defenses.detection.information_plane`): mean MI
  ``I(x) = H(T) - H(T|X)`` vs ensemble accuracy per eps;
* the MI detector (:class:`~qrobust.defenses.detection.MIDetector`): threshold at ``attack.detector_fpr``
  on clean *validation* images, AUROC and detection rate per attack and eps, FPR on clean test images;
* an adaptive attack on the detector (EOT-PGD on ``CE - lambda * s * I(x)``, ``s = +1`` when the
  detector flags high MI): how many inputs end misclassified *and* unflagged.

``full`` adds seeds (mean +- std) and ablations of the SQ+MI model over K, tau, N and beta. Every
finished stage writes a JSON file and is skipped on re-run; ``results.json`` / ``results.md`` and the
PNGs sit at the top of ``runs/<name>/``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qrobust import data as datasets
from qrobust.attacks.blackbox import square_attack
from qrobust.attacks.whitebox import GradientMaskingWarning, apgd_ce, fgsm, parse_eps, pgd
from qrobust.config import TrainSection, check_act_range
from qrobust.defenses.detection import MIDetector, auroc, information_plane
from qrobust.errors import ConfigError
from qrobust.experiment import cell_seed
from qrobust.metrics import as_float_images, predict_logits, tie_rate
from qrobust.models import model_for_data
from qrobust.quant import QuantConfig, is_quantized, quantize, set_quantization_enabled
from qrobust.quant.stochastic import (
    EnsembleSQ,
    SQConfig,
    StochasticQuantizer,
    check_num_draws,
    ensemble_entropies,
    ensemble_forward,
    ensemble_log_probs,
    insert_stochastic_quantizers,
    stochastic_quantizers,
)
from qrobust.runs import environment
from qrobust.studies.common import (
    PRESETS,
    QAT_EDGES,
    SeedStudy,
    StudyBase,
    act_range_tag,
    aggregate_seeds,
    load_study,
    open_study,
    study_preset,
)
from qrobust.train.objectives import CrossEntropy, Objective
from qrobust.train.sq_objective import MIEnsembleLoss

ATTACKS = ("fgsm", "pgd", "eot-pgd", "apgd-ce", "transfer", "bpda", "square")
ATTACK_LABELS = {"fgsm": "FGSM", "pgd": "PGD", "eot-pgd": "EOT-PGD", "apgd-ce": "APGD-CE",
                 "transfer": "transfer (PGD on float)", "bpda": "BPDA (PGD on the float twin)",
                 "square": "Square (black-box)"}
STRENGTH_CHECKS = ("apgd-ce", "bpda", "square")  # attacks that reveal where fixed-step PGD overstates robustness
ABLATION_ATTACKS = ("pgd", "eot-pgd", *STRENGTH_CHECKS)  # what the ablation stage runs on every variant

# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class DataCfg:
    name: str = "fashion-mnist"
    dir: str = ""  # empty = $QROBUST_DATA or the data set's default place
    download: bool = False
    augment: bool = True
    train_subset: int = 10000  # training images (0 = all but the validation ones)
    val_subset: int = 500  # other train images: calibration of the SQ ranges, detector threshold
    test_subset: int = 200  # held-out test images every attack runs on (0 = all)


@dataclass
class ModelCfg:
    arch: str = "lenet5"


@dataclass
class FloatCfg:
    epochs: int = 3
    batch_size: int = 128
    lr: float = 0.05  # peak LR, Nesterov SGD, 0.5 epoch warm-up then cosine


@dataclass
class QATCfg:
    bits: int = 0  # 0 = ceil(log2(sq.num_bins)), the SQ's resolution (min 2)
    epochs: int = 1
    lr: float = 0.01  # fine-tuning from the float model
    act_range: str = "ema"  # activation ranges: ema (min/max) | learned (LSQ+; better at 2 bits)


@dataclass
class SQCfg:
    num_bins: int = 4  # K bins per value
    alpha: float = 4.0  # bin-logit sharpness (noise: a value on a bin moves with prob ~exp(-alpha))
    tau: float = 1.0  # Gumbel-softmax temperature (shapes the straight-through gradient only)
    learnable: bool = True  # learnable bin offset and gaps (+ spacing regulariser)
    at_input: bool = True  # an SQ on the input pixels, range [0, 1]
    after: list[str] = field(default_factory=lambda: ["body.0"])  # SQs after these modules
    percentile: float = 99.9  # calibrated range: [min(0, q_(100-p)), q_p] of the float activations
    n_draws: int = 4  # N: ensemble draws per training step and at inference
    beta: float = 0.1  # MI weight of the sq-mi model (the sq model has beta = 0)
    spacing_weight: float = 0.01
    ce_on: str = "draws"  # draws | mean (see MIEnsembleLoss)
    epochs: int = 2
    lr: float = 0.01  # fine-tuning from the float model


@dataclass
class AttackCfg:
    norm: str = "linf"
    eps: list[str] = field(default_factory=lambda: ["0.02", "0.05", "0.1"])  # numbers or fractions
    steps: int = 10  # PGD / EOT-PGD / transfer / adaptive steps (step size 2.5 eps / steps)
    eot: int = 4  # EOT draws of the deployed ensemble per EOT-PGD step
    draws: int = 4  # robust only if correct on all these evaluations (randomised models)
    batch_size: int = 100
    detector_fpr: float = 0.05  # threshold set on clean validation images at this false-positive rate
    detector_direction: str = "above"  # flag MI above (or below) the threshold
    adaptive: bool = True  # adaptive attack on the detector (sq-mi only)
    adaptive_eps: str = ""  # eps of the adaptive attack; empty = the middle one of `eps`
    adaptive_lambda: float = 1.0  # weight of the MI term in the adaptive attacker's loss
    square_queries: int = 1000  # Square Attack (black-box, L-inf only) queries per image; 0 = off
    square_p_init: float = 0.8  # share of the image Square's first windows cover (the Square paper's MNIST value)
    apgd_steps: int = 50  # APGD-CE iterations (step-size-free PGD, Croce & Hein 2020); 0 = off

    def runs(self, attack: str) -> bool:
        """Whether these settings switch ``attack`` on: APGD-CE needs ``apgd_steps > 0``, Square an L-inf
        budget and ``square_queries > 0``; the others always run (where the model allows)."""
        if attack == "apgd-ce":
            return self.apgd_steps > 0
        if attack == "square":
            return self.norm == "linf" and self.square_queries > 0
        return True


@dataclass
class AblationCfg:
    num_bins: list[int] = field(default_factory=list)  # extra sq-mi models, one setting changed each
    tau: list[float] = field(default_factory=list)
    n_draws: list[int] = field(default_factory=list)
    beta: list[float] = field(default_factory=list)
    eps: str = ""  # one eps for the ablation table; empty = the middle one of attack.eps


@dataclass
class StudyConfig(StudyBase):
    name: str = "sq-quick"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    fp: FloatCfg = field(default_factory=FloatCfg)
    qat: QATCfg = field(default_factory=QATCfg)
    sq: SQCfg = field(default_factory=SQCfg)
    attack: AttackCfg = field(default_factory=AttackCfg)
    ablation: AblationCfg = field(default_factory=AblationCfg)

    @property
    def qat_bits(self) -> int:
        return self.qat.bits or max(2, math.ceil(math.log2(self.sq.num_bins)))

    def eps_values(self) -> list[float]:
        return [_eps(spec, self.attack.norm, "attack.eps") for spec in self.attack.eps]

    def middle_eps(self, spec: str, key: str) -> str:
        return spec if spec else self.attack.eps[len(self.attack.eps) // 2]

    def validate(self) -> StudyConfig:
        check_act_range(self.qat.act_range, "qat.act_range")
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one, e.g. seeds=[0]")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device '{self.device}' is unknown; use cpu, cuda or auto")
        if self.attack.norm not in ("linf", "l2"):
            raise ConfigError(f"attack.norm must be 'linf' or 'l2', got {self.attack.norm!r}")
        if not self.attack.eps:
            raise ConfigError(
                "attack.eps is empty; give the budgets, e.g. attack.eps=['2/255','5/255','8/255']"
            )
        eps = self.eps_values()
        if len(set(eps)) != len(eps):
            raise ConfigError(f"attack.eps has repeated values: {self.attack.eps}")
        _eps(self.middle_eps(self.attack.adaptive_eps, ""), self.attack.norm, "attack.adaptive_eps")
        _eps(self.middle_eps(self.ablation.eps, ""), self.attack.norm, "ablation.eps")
        positive = {
            "fp.epochs": self.fp.epochs,
            "fp.batch_size": self.fp.batch_size,
            "qat.epochs": self.qat.epochs,
            "sq.epochs": self.sq.epochs,
            "attack.steps": self.attack.steps,
            "attack.batch_size": self.attack.batch_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"fp.lr": self.fp.lr, "qat.lr": self.qat.lr, "sq.lr": self.sq.lr}.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        for key in ("eot", "draws"):
            _draws(getattr(self.attack, key), f"attack.{key}")
        if self.attack.square_queries < 0:
            raise ConfigError(f"attack.square_queries must be >= 0 (0 = no Square Attack), got {self.attack.square_queries}")
        if self.attack.apgd_steps < 0:
            raise ConfigError(f"attack.apgd_steps must be >= 0 (0 = no APGD-CE), got {self.attack.apgd_steps}")
        if not 0 < self.attack.square_p_init <= 1:
            raise ConfigError("attack.square_p_init (share of the image Square's first windows cover) must be in "
                              f"(0, 1], got {self.attack.square_p_init}; 0.8 suits 28x28 images, 0.05 CIFAR-10")
        if self.qat.bits and not 2 <= self.qat.bits <= 8:
            raise ConfigError(f"qat.bits must be 2..8 (or 0 = the SQ's resolution), got {self.qat.bits}")
        if not 50.0 < self.sq.percentile <= 100.0:
            raise ConfigError(f"sq.percentile must be in (50, 100], e.g. 99.9; got {self.sq.percentile}")
        if self.attack.detector_direction not in ("above", "below"):
            raise ConfigError("attack.detector_direction must be 'above' or 'below'")
        if not 0.0 < self.attack.detector_fpr < 1.0:
            raise ConfigError(
                f"attack.detector_fpr must be in (0, 1), e.g. 0.05; got {self.attack.detector_fpr}"
            )
        for variant, settings in [("sq", self.sq_settings())] + self.ablation_variants():
            _check_sq(settings, variant)
        return self

    def sq_settings(self, **changes: Any) -> dict:
        """The SQ+MI settings (``changes`` for an ablation variant)."""
        s = self.sq
        base = dict(
            num_bins=s.num_bins,
            alpha=s.alpha,
            tau=s.tau,
            learnable=s.learnable,
            n_draws=s.n_draws,
            beta=s.beta,
            spacing_weight=s.spacing_weight,
            ce_on=s.ce_on,
        )
        return base | changes

    def ablation_variants(self) -> list[tuple[str, dict]]:
        a, out = self.ablation, []
        for k in a.num_bins:
            out.append((f"sq-mi-K{k}", self.sq_settings(num_bins=k)))
        for t in a.tau:
            out.append((f"sq-mi-tau{t:g}", self.sq_settings(tau=t)))
        for n in a.n_draws:
            out.append((f"sq-mi-N{n}", self.sq_settings(n_draws=n)))
        for b in a.beta:
            out.append((f"sq-mi-beta{b:g}", self.sq_settings(beta=b)))
        return out


def preset_path(preset: str) -> Path:
    """``configs/sq-<preset>.toml`` in the working directory, else in the source checkout."""
    return study_preset("sq", preset)


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Defaults < TOML file < ``key=value`` overrides (lists as ``key=[8,4,2]``); validated."""
    return load_study(StudyConfig(), "sq", path, overrides)


def _eps(spec: Any, norm: str, key: str) -> float:
    try:
        named, value = parse_eps(spec)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    if named is not None and named != norm:
        raise ConfigError(f"{key}: budget {spec!r} is an {named} budget but attack.norm is {norm!r}")
    return value


def _draws(value: Any, key: str) -> int:
    try:
        return check_num_draws(value)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None


def _check_sq(settings: dict, variant: str) -> None:
    """Surface the building blocks' errors (K < 2, tau <= 0, N = 0, ...) with the config key."""
    try:
        SQConfig(num_bins=settings["num_bins"], alpha=settings["alpha"], tau=settings["tau"])
        MIEnsembleLoss(
            beta=settings["beta"],
            spacing_weight=settings["spacing_weight"],
            n_draws=settings["n_draws"],
            ce_on=settings["ce_on"],
        )
    except ConfigError as err:
        raise ConfigError(f"{variant} (config section [sq] / [ablation]): {err}") from None


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def calibrate_ranges(
    model: nn.Module, x: Tensor, names: list[str], percentile: float
) -> dict[str, list[float]]:
    """Per insertion point ``[low, high]``: ``[min(0, q_(100-p)), q_p]`` of the outputs of module ``name``.

    ``model`` is the trained float model (eval mode), ``x`` calibration images in [0, 1]. Percentiles are
    taken on at most 2^20 values per point (an even subsample), enough for 99.9.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules or n == ""]
    if missing:
        valid = [n for n in modules if n][:12]
        raise ConfigError(
            f"sq.after names unknown module(s) {missing}; valid names include: {', '.join(valid)}"
        )
    outputs: dict[str, list[Tensor]] = {n: [] for n in names}
    hooks = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: outputs[n].append(o.detach().flatten()))
        for n in names
    ]
    try:
        was = model.training
        model.eval()
        for start in range(0, len(x), 256):
            model(x[start : start + 256])
        model.train(was)
    finally:
        for h in hooks:
            h.remove()
    ranges = {}
    for n in names:
        values = torch.cat(outputs[n]).float()
        step = max(1, values.numel() // (1 << 20))
        values = values[::step]
        q = torch.quantile(values, torch.tensor([1 - percentile / 100, percentile / 100]))
        low, high = min(0.0, float(q[0])), float(q[1])
        if not high > low:
            raise ConfigError(
                f"the float model's activations after '{n}' are constant ({low:g}) on the calibration images: "
                "an SQ there would quantize nothing; choose other sq.after layers"
            )
        ranges[n] = [low, high]
    return ranges


def build_sq_model(
    fp: nn.Module, ranges: dict[str, list[float]], settings: dict, at_input: bool
) -> nn.Module:
    """A copy of ``fp`` with an SQ after each module in ``ranges`` (its calibrated range) and at the input."""
    model = copy.deepcopy(fp)
    common = dict(
        num_bins=settings["num_bins"],
        alpha=settings["alpha"],
        tau=settings["tau"],
        learnable=settings["learnable"],
    )
    for name, (low, high) in ranges.items():
        insert_stochastic_quantizers(model, after=[name], low=low, high=high, **common)
    if at_input:
        model = insert_stochastic_quantizers(model, at_input=True, low=0.0, high=1.0, **common)
    return model


class SQEnsembleObjective(Objective):
    """:class:`MIEnsembleLoss` as an :class:`Objective` of the one loop (adds the ``correct`` count)."""

    name = "mi-ensemble"

    def __init__(self, loss: MIEnsembleLoss):
        self.loss = loss

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        loss, metrics = self.loss(model, x, y)
        return loss, {**metrics, "correct": metrics["accuracy"] * len(y)}

    def config(self) -> dict:
        m = self.loss
        return {
            "name": self.name,
            "beta": m.beta,
            "spacing_weight": m.spacing_weight,
            "n_draws": m.n_draws,
            "ce_on": m.ce_on,
        }


# --------------------------------------------------------------------------------------------------
# Attacks and evaluation helpers
# --------------------------------------------------------------------------------------------------


def mi_adaptive_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    n_draws: int,
    steps: int = 10,
    eot: int = 1,
    lam: float = 1.0,
    sign: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Adaptive L-inf EOT-PGD against the ensemble *and* the MI detector (Tramer et al. 2020's recipe).

    Ascends ``L(x) = CE(log mean_n softmax(f_n(x)), y) - lam * sign * I(x)`` averaged over ``eot``
    independent ``n_draws``-member ensembles, with ``I = H(T) - H(T|X)`` the detector's score:
    ``sign = +1`` against a detector that flags high MI (the attacker keeps MI low), ``-1`` against one
    that flags low MI. Random start, step ``2.5 eps / steps``, projection onto the ball and [0, 1].
    """
    x = x.detach()
    if eps == 0:
        return x.clone()
    noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
    x_adv = (x + eps * (2 * noise.to(x.device, x.dtype) - 1)).clamp(0, 1)
    alpha = 2.5 * eps / steps
    b = x.shape[0]
    for _ in range(steps):
        xr = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = ensemble_forward(model, xr.repeat(eot, *([1] * (x.ndim - 1))), n_draws)  # [N, eot*B, C]
            ce = F.nll_loss(ensemble_log_probs(logits), y.repeat(eot), reduction="none")
            mi = ensemble_entropies(logits)[2]
            loss = (ce - lam * sign * mi).view(eot, b).mean(0)
            (grad,) = torch.autograd.grad(loss.sum(), xr)
        x_adv = (x + (x_adv + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv.detach()


@torch.no_grad()
def correct_on_all_draws(model: nn.Module, x: Tensor, y: Tensor, draws: int, batch_size: int) -> Tensor:
    """Per input: classified correctly on every one of ``draws`` forward passes (bool ``[B]``)."""
    out = []
    for s in range(0, len(y), batch_size):
        ok = torch.ones_like(y[s : s + batch_size], dtype=torch.bool)
        for _ in range(draws):
            ok &= model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]
        out.append(ok)
    return torch.cat(out)


@torch.no_grad()
def ensemble_stats(
    model: nn.Module, x: Tensor, y: Tensor, n_draws: int, batch_size: int
) -> tuple[Tensor, Tensor]:
    """Per input: ensemble correctness (one ``n_draws`` ensemble) and MI ``I(x)`` (nats)."""
    correct, mi = [], []
    for s in range(0, len(y), batch_size):
        logits = ensemble_forward(model, x[s : s + batch_size], n_draws)
        correct.append(ensemble_log_probs(logits).argmax(1) == y[s : s + batch_size])
        mi.append(ensemble_entropies(logits)[2].clamp_min(0.0))
    return torch.cat(correct), torch.cat(mi)


def _batched_attack(fn: Callable[..., Tensor], x: Tensor, y: Tensor, batch_size: int, **kwargs) -> Tensor:
    """``fn(x_b, y_b, check=<first batch only>, **kwargs)`` over batches."""
    out = []
    for i, s in enumerate(range(0, len(y), batch_size)):
        out.append(fn(x[s : s + batch_size], y[s : s + batch_size], check=i == 0, **kwargs))
    return torch.cat(out)


# --------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------


class _Data:
    """Training images (uint8, for the loader), validation and test images (float, on the device)."""

    def __init__(self, cfg: StudyConfig, device: torch.device):
        d = cfg.data
        ds = datasets.load_dataset(d.name, data_dir=d.dir or None, download=d.download)
        self.info = ds.info
        n = len(ds.train_y)
        n_val = min(d.val_subset, n - 1)
        n_train = min(d.train_subset or n - n_val, n - n_val)
        if n_val < 1 or n_train < 1:
            raise ConfigError(f"{d.name} has {n} training images: lower data.train_subset / data.val_subset")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(12345))
        self.train_x, self.train_y = ds.train_x[perm[:n_train]], ds.train_y[perm[:n_train]]
        val = perm[n_train : n_train + n_val]
        self.val_x, self.val_y = as_float_images(ds.train_x[val]).to(device), ds.train_y[val].to(device)
        m = len(ds.test_y)
        test = torch.randperm(m, generator=torch.Generator().manual_seed(54321))[: min(d.test_subset or m, m)]
        self.test_x, self.test_y = as_float_images(ds.test_x[test]).to(device), ds.test_y[test].to(device)


def _has_quantizers(model: nn.Module) -> bool:
    return is_quantized(model) or next(stochastic_quantizers(model), None) is not None


def float_twin(model: nn.Module) -> nn.Module:
    """BPDA's differentiable stand-in: a copy of ``model`` with every fake quantizer off and every
    stochastic quantizer replaced by the identity (the same weights, no rounding, no randomness)."""
    twin = copy.deepcopy(model).eval()
    set_quantization_enabled(twin, False)
    for name, module in list(twin.named_modules()):
        if isinstance(module, StochasticQuantizer):
            parent_name, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent_name) if parent_name else twin, child, nn.Identity())
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@dataclass
class _Deployed:
    """A trained model as the attacker meets it: ``net`` (deployed), ``raw`` (SQ network) if randomised."""

    net: nn.Module
    raw: nn.Module | None = None

    @property
    def randomised(self) -> bool:
        return self.raw is not None


class SQStudy(SeedStudy):
    """One seed of the study in ``root``; :meth:`run` does every stage not done yet."""

    def __init__(self, cfg: StudyConfig, root: Path, seed: int):
        super().__init__(cfg, root, seed)
        self.data = _Data(cfg, self.device)
        self._transfer: dict[str, Tensor] = {}

    # ---------------------------------------------------------------- helpers
    def _stage(self, name: str, fn: Callable[[], Any], complete: Callable[[Any], bool] | None = None) -> Any:
        """Return the stored result of stage ``name`` or compute and store it (with its seconds). A stored
        result that ``complete`` rejects (written before an attack was added to the study) is recomputed."""
        done = self._json(f"{name}.json")
        if done is not None and (complete is None or complete(done)):
            return done
        t0 = time.perf_counter()
        out = fn()
        self.timings[name] = time.perf_counter() - t0
        self._write_json(f"{name}.json", out)
        total = self._json("timings.json") or {}
        total[name] = self.timings[name]
        self._write_json("timings.json", total)
        return out

    def _train_section(self, epochs: int, lr: float, warmup: float) -> TrainSection:
        return TrainSection(
            epochs=epochs,
            batch_size=self.cfg.fp.batch_size,
            lr=lr,
            warmup_epochs=warmup,
            device=self.cfg.device,
        )

    def _fit(
        self,
        name: str,
        model: nn.Module,
        objective: Objective,
        train: TrainSection,
        describe: dict,
        evaluate: Callable[[nn.Module], dict],
    ) -> tuple[nn.Module, dict]:
        """Train ``model`` in its own run folder, or load it when that run is complete."""

        def loader() -> datasets.BatchLoader:
            torch.manual_seed(self.seed)  # SQ noise and MI draws during training
            return datasets.BatchLoader(self.data.train_x, self.data.train_y, train.batch_size, shuffle=True,
                                        augment=self.cfg.data.augment, info=self.data.info, device=self.device,
                                        drop_last=True, seed=self.seed)

        return self._fit_stage(name, model, objective, train, describe, loader, evaluate)

    def _eval_det(self, model: nn.Module) -> dict:
        was = model.training
        model.eval()
        ok = correct_on_all_draws(model, self.data.test_x, self.data.test_y, 1, 512)
        model.train(was)
        return {"test_acc": ok.float().mean().item()}

    def _eval_sq(self, n_draws: int) -> Callable[[nn.Module], dict]:
        def evaluate(model: nn.Module) -> dict:
            was = model.training
            model.eval()
            correct, mi = ensemble_stats(model, self.data.test_x, self.data.test_y, n_draws, 256)
            model.train(was)
            return {"test_acc": correct.float().mean().item(), "test_mi": mi.mean().item()}

        return evaluate

    # ---------------------------------------------------------------- stage 1: models
    def train_models(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(self.seed)
        fp = model_for_data(cfg.model.arch, self.data.info)
        fp, fp_res = self._fit(
            "fp32", fp, CrossEntropy(), self._train_section(cfg.fp.epochs, cfg.fp.lr, 0.5), {}, self._eval_det
        )
        self.models["fp32"] = _Deployed(fp)
        bits = cfg.qat_bits
        torch.manual_seed(self.seed)
        q = quantize(fp, QuantConfig(weight_bits=bits, act_bits=bits, act_range=cfg.qat.act_range))
        q, q_res = self._fit(
            f"qat{bits}",
            q,
            CrossEntropy(),
            self._train_section(cfg.qat.epochs, cfg.qat.lr, 0.0),
            {"bits": bits, **act_range_tag(cfg.qat.act_range), **QAT_EDGES},
            self._eval_det,
        )
        self.models[f"qat{bits}"] = _Deployed(q)
        ranges = self._stage(
            "calibration",
            lambda: calibrate_ranges(fp, self.data.val_x, list(cfg.sq.after), cfg.sq.percentile),
        )
        summary = {"fp32": fp_res, f"qat{bits}": q_res}
        variants = [("sq", cfg.sq_settings(beta=0.0)), ("sq-mi", cfg.sq_settings())] + cfg.ablation_variants()
        for name, settings in tqdm(variants, desc="SQ models", disable=not self.progress, leave=False):
            torch.manual_seed(self.seed)
            model = build_sq_model(fp, ranges, settings, cfg.sq.at_input)
            objective = SQEnsembleObjective(
                MIEnsembleLoss(
                    settings["beta"], settings["spacing_weight"], settings["n_draws"], settings["ce_on"]
                )
            )
            describe = {k: settings[k] for k in ("num_bins", "alpha", "tau", "learnable")} | {
                "at_input": cfg.sq.at_input,
                "after": list(cfg.sq.after),
                "ranges": ranges,
            }
            model, res = self._fit(
                name,
                model,
                objective,
                self._train_section(cfg.sq.epochs, cfg.sq.lr, 0.0),
                describe,
                self._eval_sq(settings["n_draws"]),
            )
            self.models[name] = _Deployed(EnsembleSQ(model, settings["n_draws"]).eval(), model)
            summary[name] = res
        return {name: {k: v for k, v in res.items() if k != "complete"} for name, res in summary.items()}

    # ---------------------------------------------------------------- stage 2: attacks
    def _attack(self, model: _Deployed, attack: str, eps: float, eot: int | None = None) -> Tensor:
        a, x, y = self.cfg.attack, self.data.test_x, self.data.test_y
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1000 + 17)
        if attack == "fgsm":
            fn, kwargs = fgsm, {}
        elif attack == "apgd-ce":  # one gradient of the deployed ensemble per step, as PGD (see docs/CHOICES.md)
            fn, kwargs = apgd_ce, {"steps": a.apgd_steps, "generator": gen}
        else:
            fn, kwargs = pgd, {"steps": a.steps, "generator": gen}
        if attack == "square":
            return _batched_attack(
                lambda xb, yb, check, **k: square_attack(model.net, xb, yb, eps, queries=a.square_queries,
                                                           p_init=a.square_p_init,
                                                           common_noise=model.randomised, **k),
                x, y, a.batch_size, generator=gen,
            )
        if attack == "bpda":
            twin = float_twin(model.raw if model.randomised else model.net)
            return _batched_attack(
                lambda xb, yb, **k: pgd(twin, xb, yb, eps, norm=a.norm, **k), x, y, a.batch_size, **kwargs
            )
        if attack == "transfer":
            key = f"{eps!r}"
            if key not in self._transfer:  # the same float-model examples for every target
                fp = self.models["fp32"].net
                with torch.random.fork_rng(devices=[]):  # leaves the global RNG (SQ noise) as it was
                    self._transfer[key] = _batched_attack(
                        lambda xb, yb, **k: pgd(fp, xb, yb, eps, norm=a.norm, **k), x, y, a.batch_size, **kwargs
                    )
            return self._transfer[key]
        draws = (eot or a.eot) if attack == "eot-pgd" else 1
        with warnings.catch_warnings():
            if model.randomised and draws == 1:  # the single-gradient attack on a random model is intended
                warnings.simplefilter("ignore", GradientMaskingWarning)
            return _batched_attack(
                lambda xb, yb, **k: fn(model.net, xb, yb, eps, norm=a.norm, eot=draws, **k),
                x,
                y,
                a.batch_size,
                **kwargs,
            )

    def _tie_rate(self, model: _Deployed) -> float:
        """Tie rate of the deployed output (an SQ model: its ensemble's mean probabilities, one evaluation);
        the global RNG is left as it was, so the attacks that follow draw the same SQ noise."""
        with torch.random.fork_rng(devices=[]):
            return tie_rate(predict_logits(model.net, self.data.test_x, self.cfg.attack.batch_size))

    def evaluate_model(self, name: str) -> dict:
        """Clean and robust accuracy per attack and eps; for SQ models the AIP rows and detector metrics.
        Seeds the global RNG (the SQ noise) itself, so its numbers do not depend on what ran before."""
        torch.manual_seed(cell_seed(self.seed, "eval", name))
        a = self.cfg.attack
        model = self.models[name]
        x, y = self.data.test_x, self.data.test_y
        draws = a.draws if model.randomised else 1
        clean_ok = correct_on_all_draws(model.net, x, y, draws, a.batch_size)
        out: dict[str, Any] = {
            "clean_acc_all_draws": clean_ok.float().mean().item(),
            "tie_rate": self._tie_rate(model),
            "robust": {},
            "adv_acc": {},
        }
        has_twin = _has_quantizers(model.raw if model.randomised else model.net)
        attacks = [k for k in ATTACKS if a.runs(k) and (k != "eot-pgd" or model.randomised)
                   and (k != "bpda" or has_twin)]
        cache: dict[str, dict[float, Tensor]] = {k: {} for k in attacks}
        n_draws = None
        if model.randomised:
            n_draws = model.net.n_draws
            ens_ok, clean_mi = ensemble_stats(model.raw, x, y, n_draws, a.batch_size)
            val_mi = ensemble_stats(model.raw, self.data.val_x, self.data.val_y, n_draws, a.batch_size)[1]
            det = MIDetector(fpr=a.detector_fpr, n_draws=n_draws, direction=a.detector_direction).fit_scores(
                val_mi
            )
            out["clean_acc"] = ens_ok.float().mean().item()
            out["detector"] = {
                "threshold": det.threshold,
                "direction": det.direction,
                "fpr_val": det.flag(val_mi).float().mean().item(),
                "fpr_test": det.flag(clean_mi).float().mean().item(),
                "clean_mi": clean_mi.mean().item(),
                "auroc": {},
                "detection_rate": {},
                "adv_mi": {},
            }
        else:
            out["clean_acc"] = out["clean_acc_all_draws"]
        bar = tqdm(
            [(k, s) for k in attacks for s in a.eps],
            desc=f"attacks on {name}",
            disable=not self.progress,
            leave=False,
        )
        for attack, spec in bar:
            eps = _eps(spec, a.norm, "attack.eps")
            x_adv = self._attack(model, attack, eps)
            cache[attack][eps] = x_adv
            robust = clean_ok & correct_on_all_draws(model.net, x_adv, y, draws, a.batch_size)
            out["robust"].setdefault(attack, {})[spec] = robust.float().mean().item()
            if model.randomised:
                ok, mi = ensemble_stats(model.raw, x_adv, y, n_draws, a.batch_size)
                out["adv_acc"].setdefault(attack, {})[spec] = ok.float().mean().item()
                d = out["detector"]
                d["auroc"].setdefault(attack, {})[spec] = _auroc(clean_mi, mi, a.detector_direction)
                d["detection_rate"].setdefault(attack, {})[spec] = det.flag(mi).float().mean().item()
                d["adv_mi"].setdefault(attack, {})[spec] = mi.mean().item()
            else:
                out["adv_acc"].setdefault(attack, {})[spec] = robust.float().mean().item()
        if not model.randomised:  # EOT over draws of a deterministic model is PGD itself
            out["robust"]["eot-pgd"] = dict(out["robust"]["pgd"])
            out["adv_acc"]["eot-pgd"] = dict(out["adv_acc"]["pgd"])
        else:
            out["aip"] = {}
            for attack in ("fgsm", "pgd", "eot-pgd"):
                lookup = cache[attack]
                rows = information_plane(
                    model.raw,
                    x,
                    y,
                    lambda m, xs, ys, e, lookup=lookup: lookup[e],
                    [0.0] + sorted(lookup),
                    n_draws=n_draws,
                    batch_size=a.batch_size,
                )
                out["aip"][attack] = rows
        for off in [k for k in ATTACKS if not a.runs(k)]:  # switched off (Square: or an L2 budget): n/a
            out["robust"][off] = {spec: float("nan") for spec in a.eps}
            out["adv_acc"][off] = {spec: float("nan") for spec in a.eps}
            if model.randomised:
                for key in ("auroc", "detection_rate", "adv_mi"):
                    out["detector"][key][off] = {spec: float("nan") for spec in a.eps}
        if not has_twin:  # a model without quantizers is its own float twin: BPDA is PGD
            for key in ("robust", "adv_acc"):
                out[key]["bpda"] = dict(out[key]["pgd"])
            if model.randomised:
                for key in ("auroc", "detection_rate", "adv_mi"):
                    out["detector"][key]["bpda"] = dict(out["detector"][key]["pgd"])
        return out

    def adaptive(self) -> dict:
        """Adaptive EOT-PGD on the sq-mi model and its detector, vs the non-adaptive EOT-PGD, at one eps.
        Seeds the global RNG (the SQ noise) itself."""
        torch.manual_seed(cell_seed(self.seed, "adaptive"))
        a = self.cfg.attack
        model = self.models["sq-mi"]
        spec = self.cfg.middle_eps(a.adaptive_eps, "attack.adaptive_eps")
        eps = _eps(spec, a.norm, "attack.adaptive_eps")
        x, y, n = self.data.test_x, self.data.test_y, model.net.n_draws
        val_mi = ensemble_stats(model.raw, self.data.val_x, self.data.val_y, n, a.batch_size)[1]
        det = MIDetector(fpr=a.detector_fpr, n_draws=n, direction=a.detector_direction).fit_scores(val_mi)
        clean_ok, clean_mi = ensemble_stats(model.raw, x, y, n, a.batch_size)
        gen = torch.Generator(device=x.device).manual_seed(self.seed * 1000 + 29)
        sign = 1.0 if a.detector_direction == "above" else -1.0
        out = {"eps": spec, "lambda": a.adaptive_lambda, "threshold": det.threshold}
        for label, lam in (("eot-pgd", 0.0), ("adaptive", a.adaptive_lambda)):
            x_adv = torch.cat(
                [
                    mi_adaptive_pgd(
                        model.raw,
                        x[s : s + a.batch_size],
                        y[s : s + a.batch_size],
                        eps,
                        n_draws=n,
                        steps=a.steps,
                        eot=a.eot,
                        lam=lam,
                        sign=sign,
                        generator=gen,
                    )
                    for s in range(0, len(y), a.batch_size)
                ]
            )
            ok, mi = ensemble_stats(model.raw, x_adv, y, n, a.batch_size)
            flagged = det.flag(mi)
            robust = correct_on_all_draws(model.net, x, y, a.draws, a.batch_size) & correct_on_all_draws(
                model.net, x_adv, y, a.draws, a.batch_size
            )
            out[label] = {
                "robust_acc": robust.float().mean().item(),
                "adv_acc": ok.float().mean().item(),
                "detection_rate": flagged.float().mean().item(),
                "auroc": _auroc(clean_mi, mi, a.detector_direction),
                "mean_mi": mi.mean().item(),
                # the attacker's goal: misclassified and not flagged (among clean-correct inputs)
                "undetected_success": ((~ok) & (~flagged) & clean_ok).float().mean().item(),
            }
        return out

    def ablation(self) -> dict:
        """Clean accuracy, MI and robust accuracy (PGD, EOT-PGD and the checks APGD-CE / BPDA / Square) of
        every ablation variant at one eps. Each variant's row seeds the global RNG (the SQ noise) itself."""
        a = self.cfg.attack
        spec = self.cfg.middle_eps(self.cfg.ablation.eps, "ablation.eps")
        eps = _eps(spec, a.norm, "ablation.eps")
        x, y = self.data.test_x, self.data.test_y
        rows = {}
        for name, _ in [("sq-mi", None)] + self.cfg.ablation_variants():
            torch.manual_seed(cell_seed(self.seed, "ablation", name))
            model = self.models[name]
            ok, mi = ensemble_stats(model.raw, x, y, model.net.n_draws, a.batch_size)
            clean = correct_on_all_draws(model.net, x, y, a.draws, a.batch_size)
            row = {"clean_acc": ok.float().mean().item(), "clean_mi": mi.mean().item()}
            for attack in [k for k in ABLATION_ATTACKS if a.runs(k)]:
                x_adv = self._attack(model, attack, eps)
                row[attack] = (
                    (clean & correct_on_all_draws(model.net, x_adv, y, a.draws, a.batch_size))
                    .float()
                    .mean()
                    .item()
                )
            rows[name] = row
        return {"eps": spec, "rows": rows}

    # ---------------------------------------------------------------- all stages
    def run(self) -> dict:
        t0 = time.perf_counter()
        models = self.train_models()  # trains what is missing, loads finished runs (later stages need them)
        self._write_json("models.json", models)
        evaluation = {
            name: self._stage(f"eval-{name}", lambda name=name: self.evaluate_model(name),
                              lambda done: set(ATTACKS) <= set(done.get("robust", {})))
            for name in ["fp32", f"qat{self.cfg.qat_bits}", "sq", "sq-mi"]
        }
        result = {"seed": self.seed, "models": models, "evaluation": evaluation}
        if self.cfg.attack.adaptive:
            result["adaptive"] = self._stage("adaptive", self.adaptive)
        if self.cfg.ablation_variants():
            wanted = {k for k in ABLATION_ATTACKS if self.cfg.attack.runs(k)}
            result["ablation"] = self._stage("ablation", self.ablation,
                                             lambda done: all(wanted <= set(r) for r in done["rows"].values()))
        result["stage_seconds_this_call"] = self.timings
        result["stage_seconds_total"] = self._json("timings.json") or {}
        result["wall_seconds_this_call"] = time.perf_counter() - t0
        self._write_json("results.json", result)
        return result


def _auroc(clean: Tensor, adv: Tensor, direction: str) -> float:
    """AUROC of the MI detector (``direction`` = which side it flags): 1 = perfect, 0.5 = chance."""
    return auroc(clean, adv) if direction == "above" else auroc(-clean, -adv)


# --------------------------------------------------------------------------------------------------
# Aggregation, tables, plots
# --------------------------------------------------------------------------------------------------


def _m(cell: Any) -> float:
    return cell["mean"] if isinstance(cell, dict) and "mean" in cell else float(cell)


def _fmt(cell: Any, seeds: int, percent: bool = True) -> str:
    mean = _m(cell)
    std = cell["std"] if isinstance(cell, dict) and "std" in cell else 0.0
    if math.isnan(mean):
        return "n/a"
    if percent:
        return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if seeds > 1 else "")


def model_names(cfg: StudyConfig) -> list[str]:
    return ["fp32", f"qat{cfg.qat_bits}", "sq", "sq-mi"]


def model_label(cfg: StudyConfig, name: str) -> str:
    n = cfg.sq.n_draws
    return {
        "fp32": "float",
        f"qat{cfg.qat_bits}": f"QAT {cfg.qat_bits}-bit (deterministic)",
        "sq": f"SQ, no MI (beta=0, N={n})",
        "sq-mi": f"SQ + MI (beta={cfg.sq.beta:g}, N={n})",
    }.get(name, name)


def results_markdown(cfg: StudyConfig, agg: dict, seeds: int, compute_seconds: float) -> str:
    a, s = cfg.attack, cfg.sq
    ev = agg["evaluation"]
    lines = [
        f"# SQ white-box study: {cfg.name}",
        "",
        f"Data {cfg.data.name} ({cfg.data.test_subset or 'all'} test images), model {cfg.model.arch}, "
        f"seeds {cfg.seeds} ({'mean ± std' if seeds > 1 else 'one seed'}); compute {compute_seconds / 60:.1f} min "
        f"on {cfg.device}.",
        "",
        f"SQ: K={s.num_bins} bins, alpha={s.alpha:g}, tau={s.tau:g}, learnable={s.learnable}, at the input "
        f"({s.at_input}) and after {list(s.after)} (ranges calibrated at the {s.percentile:g}th percentile of "
        f"the float model's activations); N={s.n_draws} draws in training and at inference. Attacks: "
        f"{a.norm} FGSM; PGD ({a.steps} steps, step 2.5 eps/steps, random start, one gradient of the deployed "
        f"N-draw ensemble per step); EOT-PGD (the same averaged over {a.eot} ensembles = {a.eot * s.n_draws} "
        f"draws per step); APGD-CE ({a.apgd_steps} steps, step-size-free with momentum and restarts from the "
        f"best point, one gradient of the deployed ensemble per step); transfer = PGD made on the float model; BPDA = PGD on the model's float twin "
        f"(quantizers off, SQs as identity), evaluated on the model; Square = Square Attack (black-box, "
        f"{a.square_queries} queries per image, p_init {a.square_p_init:g}, margin of the deployed model's output; "
        f"on a randomised model each step compares candidate and current point under the same SQ noise "
        f"(common random numbers, 2 queries per step); no gradients, so "
        f"no gradient masking). Robust = correct clean *and* attacked on "
        f"all {a.draws} independent evaluations of the deployed ensemble (deterministic models: one). "
        f"**worst case** = the lowest robust accuracy over all attacks: the number to quote.",
        "",
        "## Robust accuracy (%) vs eps",
        "",
        "| model | clean (ensemble) | clean (all draws) | tie rate | attack | "
        + " | ".join(f"eps={e}" for e in a.eps)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(a.eps),
    ]
    for name in model_names(cfg):
        e = ev[name]
        for attack in ATTACKS:
            lines.append(
                f"| {model_label(cfg, name)} | {_fmt(e['clean_acc'], seeds)} | "
                f"{_fmt(e['clean_acc_all_draws'], seeds)} | "
                f"{_fmt(e['tie_rate'], seeds) if 'tie_rate' in e else '-'} | {ATTACK_LABELS[attack]} | "
                + " | ".join(_fmt(e["robust"][attack][spec], seeds) for spec in a.eps)
                + " |"
            )
        worst = [_worst(e["robust"], spec) for spec in a.eps]
        lines.append(f"| {model_label(cfg, name)} | | | | **worst case** | "
                     + " | ".join(f"**{100 * w:.1f}**" for w in worst) + " |")
    masking = []
    for name in model_names(cfg):
        e = ev[name]["robust"]
        for check_attack in STRENGTH_CHECKS:
            gaps = [_m(e["pgd"][spec]) - _m(e[check_attack][spec]) for spec in a.eps]
            gap = max((g for g in gaps if not math.isnan(g)), default=float("nan"))
            if gap > 0.02:
                masking.append(f"{model_label(cfg, name)}: {ATTACK_LABELS[check_attack]} by up to {100 * gap:.1f} points")
    check = ("**Attack-strength check**: a stronger or gradient-free attack beats fixed-step PGD on "
             + "; ".join(masking) + ". PGD's numbers there are inflated (by misleading quantizer gradients if "
             "BPDA or Square wins, by PGD's fixed step size if APGD-CE wins); quote the worst case."
             if masking else "**Attack-strength check**: neither APGD-CE, BPDA nor the black-box Square Attack "
             "beats PGD by more than 2 points on any model: no sign that PGD's gradients are masked by the "
             "quantizers.")
    fp = ev["fp32"]["robust"]
    square_strength = [(_m(fp["square"][spec]), _m(fp["pgd"][spec])) for spec in a.eps]
    if not any(math.isnan(q) for q, _ in square_strength):
        check += (" How strong the black-box check is: on the float model (no masking possible) Square leaves "
                  + ", ".join(f"{100 * q:.1f}% vs PGD's {100 * g:.1f}%" for q, g in square_strength)
                  + f" (eps {', '.join(a.eps)}), so it can only reveal masking that PGD's number overstates by more "
                  "than that gap.")
    lines += [
        "",
        check,
        "",
        "Deterministic models: EOT-PGD = PGD (nothing to average). Figure: robust_accuracy.png.",
        "",
        "## MI detector and adversarial information plane",
        "",
        f"Threshold at {100 * a.detector_fpr:g}% FPR on {cfg.data.val_subset} clean validation images, flags "
        f"MI {a.detector_direction} the threshold. AUROC clean test vs attacked test images (0.5 = chance); "
        "detection rate = share of attacked images flagged; ensemble accuracy on the attacked images.",
        "",
    ]
    for name in ("sq", "sq-mi"):
        d = ev[name]["detector"]
        lines += [
            f"**{model_label(cfg, name)}**: clean MI {_fmt(d['clean_mi'], seeds, False)} nats, "
            f"FPR val {_fmt(d['fpr_val'], seeds)}%, FPR test {_fmt(d['fpr_test'], seeds)}%",
            "",
            "| attack | eps | ensemble acc | mean MI | AUROC | detection rate |",
            "|---|---|---|---|---|---|",
        ]
        for attack in ATTACKS:
            for spec in a.eps:
                lines.append(
                    f"| {ATTACK_LABELS[attack]} | {spec} | {_fmt(ev[name]['adv_acc'][attack][spec], seeds)} | "
                    f"{_fmt(d['adv_mi'][attack][spec], seeds, False)} | "
                    f"{_fmt(d['auroc'][attack][spec], seeds, False)} | "
                    f"{_fmt(d['detection_rate'][attack][spec], seeds)} |"
                )
        lines.append("")
    lines.append("Figure: aip.png (mean MI vs ensemble accuracy, points in eps order).")
    if "adaptive" in agg:
        ad = agg["adaptive"]
        lines += [
            "",
            f"## Adaptive attack on the detector (SQ + MI, eps={ad['eps']})",
            "",
            f"EOT-PGD on CE - lambda * I(x), lambda={a.adaptive_lambda:g} (the attacker keeps the detector's "
            "score on the unflagged side), vs plain EOT-PGD (lambda=0). Undetected success = share of test "
            "images classified correctly clean that end misclassified *and* unflagged.",
            "",
            "| attack | robust acc | ensemble acc | mean MI | AUROC | detection rate | undetected success |",
            "|---|---|---|---|---|---|---|",
        ]
        for label in ("eot-pgd", "adaptive"):
            r = ad[label]
            lines.append(
                f"| {label} | {_fmt(r['robust_acc'], seeds)} | {_fmt(r['adv_acc'], seeds)} | "
                f"{_fmt(r['mean_mi'], seeds, False)} | {_fmt(r['auroc'], seeds, False)} | "
                f"{_fmt(r['detection_rate'], seeds)} | {_fmt(r['undetected_success'], seeds)} |"
            )
    else:
        lines += ["", "Adaptive attack on the detector: not run (attack.adaptive = false)."]
    if "ablation" in agg:
        ab = agg["ablation"]
        lines += [
            "",
            f"## Ablations (SQ + MI, one setting changed; eps={ab['eps']})",
            "",
            "| variant | clean acc | clean MI | PGD | EOT-PGD | APGD-CE | BPDA | Square | worst case |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in ab["rows"].items():
            robust = [r[k] for k in ABLATION_ATTACKS if k in r]
            worst = min(v for v in (_m(c) for c in robust) if not math.isnan(v))
            cells = " | ".join(_fmt(r[k], seeds) if k in r else "n/a"
                               for k in ABLATION_ATTACKS)
            lines.append(f"| {name} | {_fmt(r['clean_acc'], seeds)} | {_fmt(r['clean_mi'], seeds, False)} | "
                         f"{cells} | **{100 * worst:.1f}** |")
    lines += ["", "## Reading", "", _reading(cfg, agg), ""]
    return "\n".join(lines)


def _worst(robust: dict, spec: str) -> float:
    """Lowest robust accuracy over every attack that ran (NaN = not run) at ``spec``."""
    return min((v for v in (_m(robust[k][spec]) for k in ATTACKS if k in robust) if not math.isnan(v)),
               default=float("nan"))


def _reading(cfg: StudyConfig, agg: dict) -> str:
    """One honest paragraph generated from the numbers: what survives EOT and the strongest attack."""
    ev, a = agg["evaluation"], cfg.attack
    spec = a.eps[len(a.eps) // 2]
    pgd_, eot = _m(ev["sq-mi"]["robust"]["pgd"][spec]), _m(ev["sq-mi"]["robust"]["eot-pgd"][spec])
    qat = f"qat{cfg.qat_bits}"
    fp_, q = _m(ev["fp32"]["robust"]["pgd"][spec]), _m(ev[qat]["robust"]["pgd"][spec])
    text = (
        f"At eps={spec}, PGD leaves the float model {100 * fp_:.1f}% and the deterministic QAT model "
        f"{100 * q:.1f}%; the SQ+MI ensemble keeps {100 * pgd_:.1f}% against a single-gradient PGD and "
        f"{100 * eot:.1f}% once the attack averages gradients over {a.eot} ensembles (EOT). "
    )
    if pgd_ - eot > 0.05:
        text += (
            "The gap is robustness that exists only against an attacker who ignores the randomness: "
            "report the EOT number. "
        )
    else:
        text += "EOT changes little here: the single-gradient attack was already about as strong. "
    text += (
        f"Over all attacks the worst case is {100 * _worst(ev['fp32']['robust'], spec):.1f}% (float), "
        f"{100 * _worst(ev[qat]['robust'], spec):.1f}% (QAT) and {100 * _worst(ev['sq-mi']['robust'], spec):.1f}% "
        "(SQ+MI): those are the numbers to compare. "
        "The paper's claim (> 50% under PGD(5/255) on CIFAR-10 without adversarial training) should be "
        "judged against the worst case, on the `paper` preset."
    )
    return text


def _plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, ev = cfg.attack, agg["evaluation"]
    eps = cfg.eps_values()
    panels = ["worst"] + list(ATTACKS)  # the worst case first: the number to quote
    cols = 4
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4 * cols, 3.4 * rows))
    for i, attack in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name in model_names(cfg):
            e = ev[name]
            curve = [_worst(e["robust"], s) if attack == "worst" else _m(e["robust"][attack][s]) for s in a.eps]
            ax.plot(
                [0.0] + eps,
                [100 * _m(e["clean_acc_all_draws"])] + [100 * v for v in curve],
                "-o",
                label=model_label(cfg, name),
            )
        ax.set_title("worst case over all attacks" if attack == "worst" else ATTACK_LABELS[attack],
                     fontweight="bold" if attack == "worst" else "normal")
        ax.set_xlabel(f"eps ({a.norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
        if attack == "worst":
            ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "robust_accuracy.png"))

    fig = Figure(figsize=(8, 3.8))
    for i, name in enumerate(("sq", "sq-mi")):
        ax = fig.add_subplot(1, 2, i + 1)
        for attack, rows in ev[name]["aip"].items():
            ax.plot(
                [_m(r["mean_mi"]) for r in rows],
                [_m(r["accuracy"]) for r in rows],
                "-o",
                label=ATTACK_LABELS[attack],
            )
            for r in rows:
                ax.annotate(
                    f"{_m(r['eps']):.3g}",
                    (_m(r["mean_mi"]), _m(r["accuracy"])),
                    fontsize=6,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        ax.set_title(f"AIP: {model_label(cfg, name)}", fontsize=9)
        ax.set_xlabel("mean MI between draws [nats]")
        ax.set_ylabel("ensemble accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "aip.png"))


def run_study(cfg: StudyConfig, executor=None) -> dict:
    """Run (or resume) every seed of the study; write ``results.json``, ``results.md`` and the plots."""
    if executor is not None and executor.name != "local":
        raise ConfigError("this study does not run on the study engine yet: use --executor local")
    root, run = open_study(cfg)
    t0 = time.perf_counter()
    per_seed = [
        SQStudy(cfg, root / f"seed-{seed}", seed).run()
        for seed in tqdm(cfg.seeds, desc="seeds", disable=not cfg.progress or len(cfg.seeds) == 1)
    ]
    keys = ["models", "evaluation"] + [k for k in ("adaptive", "ablation") if k in per_seed[0]]
    agg = {k: aggregate_seeds([r[k] for r in per_seed]) for k in keys}
    compute = sum(
        sum(r["stage_seconds_total"].values())
        + sum(m.get("train_seconds_total", 0.0) for m in r["models"].values())
        for r in per_seed
    )
    results = {
        "complete": True,
        "name": cfg.name,
        "seeds": cfg.seeds,
        "eps": cfg.attack.eps,
        "eps_values": cfg.eps_values(),
        **agg,
        "adaptive_done": "adaptive" in agg,
        "per_seed_stage_seconds": {str(r["seed"]): r["stage_seconds_total"] for r in per_seed},
        "wall_seconds_this_call": time.perf_counter() - t0,
        "environment": environment(cfg.device),
    }
    run.write_json("results.json", results)
    run.write_text("results.md", results_markdown(cfg, agg, len(cfg.seeds), compute))
    _plots(cfg, agg, root)
    return results


__all__ = [
    "ATTACKS",
    "PRESETS",
    "SQStudy",
    "StudyConfig",
    "build_sq_model",
    "calibrate_ranges",
    "load_study_config",
    "mi_adaptive_pgd",
    "preset_path",
    "run_study",
]
