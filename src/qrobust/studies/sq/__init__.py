"""The stochastic-quantizer white-box study: ``qrobust run sq [--preset smoke|quick|full|paper]``.

Paper: A. Farkya, A. Raghavan, A. Ziskind, "Improving the Robustness of Quantized Deep Neural Networks to
White-Box Attacks using Stochastic Quantization and Information-Theoretic Ensemble Training",
arXiv:2312.00105 (2023). Claim: > 50% accuracy under PGD(5/255) on CIFAR-10 without adversarial
training, from a differentiable stochastic quantizer (SQ) and an MI-regularised ensemble objective.

Threat model (DESIGN.md, 3): white-box L-inf attacks on inputs in [0, 1]; the attacker knows the weights
and the SQ's distribution, not its draws, so it may average gradients over draws (EOT, Athalye et al.
2018). The defended model is the deployed ensemble ``f(x) = log mean_{n<=N} softmax(f_n(x))`` (N SQ draws,
:class:`~qrobust.quant.stochastic.EnsembleSQ`); it stays random at inference.

Models (per seed, each its own resumable run folder ``seed-<s>/models/<name>``):

* ``fp32``: the float network, cross-entropy; ``fp32-ft``: it fine-tuned for the SQ models' extra epochs
  (the matched control);
* ``qat<b>``: deterministic QAT fine-tuned from it, ``b = ceil(log2 K)`` bits (the SQ's resolution);
* ``sq``: SQs at the input and after ``sq.after`` layers, fine-tuned from fp32 with the ensemble loss and
  ``beta = 0`` (no MI term);
* ``sq-mi``: the same with the MI ensemble objective (:class:`~qrobust.train.sq_objective.MIEnsembleLoss`),
  in the reading ``sq.mi_on`` (docs/CHOICES.md): ``last-sq`` (default) / ``every-sq``::

      L = mean_n CE(f_n(x), y) + beta * I(X; T) + w * sum_SQ R_spacing

  with ``T`` the quantized values of the SQ before the classifier (or of every SQ), their law given the
  image estimated across the N draws; ``output``: ``L = CE - beta * [H(T) - H(T|X)]`` with ``T`` a draw's
  class output (``H(T) = H(mean_n p_n)``, ``H(T|X) = mean_n H(p_n)`` over the N draws of one image).

Each SQ's bins start uniform over a range calibrated on the trained float model's activations at that
insertion point (``[min(0, q_lo), q_hi]``, ``q`` the ``sq.percentile``-th percentiles; the input SQ uses
the pixel range [0, 1]).

Evaluation (all on the same held-out test images, attacks in one batched pass per step):

* robust accuracy vs eps for FGSM, PGD (one gradient of the deployed ensemble per step), EOT-PGD
  (``attack.eot`` ensemble draws per step), a transfer attack (PGD made on the float model, a
  black-box check) and BPDA (Athalye et al. 2018): PGD on the model's *float twin* (the same weights
  with every fake quantizer off and every SQ replaced by the identity), evaluated on the model itself.
  Quantizers give gradients only through straight-through estimates; if BPDA beats PGD on a quantized
  model, its PGD number was inflated by gradient masking and BPDA's is the honest one. One counting rule
  for every model: ``attack.draws`` evaluations of the deployed model; ``accuracy_expected`` = their
  mean, ``accuracy_strict`` = correct (clean and attacked) on all of them (``robust`` holds the strict
  figure, the definition of :func:`~qrobust.attacks.whitebox.robust_accuracy`); the worst case is per
  image over the attacks. Every test image is attacked once and the adversarial inputs are reused for the
  AIP and the detector;
* the adversarial information plane (:func:`~qrobust.defenses.detection.information_plane`): mean MI
  ``I(x) = H(T) - H(T|X)`` vs ensemble accuracy per eps;
* the MI detector (:class:`~qrobust.defenses.detection.MIDetector`): threshold at ``attack.detector_fpr``
  on clean *validation* images, AUROC and detection rate per attack and eps, FPR on clean test images;
* an adaptive attack on the detector (EOT-PGD on ``CE - lambda * s * I(x)``, ``s = +1`` when the
  detector flags high MI): how many inputs end misclassified *and* unflagged.

``full`` adds seeds (mean +- std) and ablations of the SQ+MI model over K, tau, N and beta. The study
runs on the study engine (:mod:`qrobust.experiment`, local or Ray): trained models and the calibration
are resumable stages, every evaluation a cell (see :mod:`.spec`); ``results.json`` / ``results.md`` and
the PNGs sit at the top of ``runs/<name>/``.

Layout: ``config.py`` (settings, presets), ``attacks.py`` (the attacks by name), ``evaluate.py`` (what a
cell computes), ``spec.py`` (models, grid, aggregation), ``report.py`` (tables, figures). The reusable
pieces live in the library: SQ calibration and insertion and the float twin in
:mod:`qrobust.quant.sq_model`, ensemble evaluation in :mod:`qrobust.quant.stochastic`, the MI-adaptive
attack in :mod:`qrobust.attacks.adaptive`, the training objective in :mod:`qrobust.train.sq_objective`.
"""

from __future__ import annotations

from qrobust import experiment
from qrobust.attacks.adaptive import mi_adaptive_pgd
from qrobust.experiment import PRESETS
from qrobust.quant.sq_model import build_sq_model, calibrate_ranges, float_twin
from qrobust.studies.sq.attacks import ATTACKS
from qrobust.studies.sq.config import StudyConfig, load_study_config, preset_path
from qrobust.studies.sq.spec import SPEC, SQSpec


def run_study(cfg: StudyConfig, executor=None) -> dict:
    """Run (or resume) every seed of the study on ``executor`` (default: in this process); writes
    ``results.json``, ``results.md`` and the figures, returns ``results.json``."""
    return experiment.run_study(SPEC, cfg, executor)


__all__ = [
    "ATTACKS", "PRESETS", "SPEC", "SQSpec", "StudyConfig", "build_sq_model", "calibrate_ranges", "float_twin",
    "load_study_config", "mi_adaptive_pgd", "preset_path", "run_study",
]
