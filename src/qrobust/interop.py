"""Hand qrobust models to other toolkits: :func:`to_art` makes an ART classifier (Nicolae et al. 2018,
"Adversarial Robustness Toolbox v1.0.0", arXiv:1807.01069).

ART is an optional extra (``pip install qrobust[art]``); it is imported only inside :func:`to_art`.

Randomised models (stochastic quantizers, :mod:`qrobust.quant.stochastic`) get Expectation over
Transformation built in (Athalye et al. 2018, "Obfuscated Gradients Give a False Sense of Security"):
the classifier wraps the model in :class:`EOTWrapper`, whose output is the mean over ``eot`` draws of
the per-draw *log-probabilities*, and its loss is ``NLLLoss``. The negative log-likelihood of a mean of
log-probabilities is the mean of the per-draw cross-entropies, so every ART attack that follows the
classifier's ``loss_gradient`` (FGSM, PGD, APGD, ...) follows

    g(x) = 1/n * sum_{i=1..n} grad_x CE(f(x; omega_i), y),

the EOT gradient of :mod:`qrobust.attacks.whitebox` (``eot=n``). Averaging logits would instead give the
gradient of the cross-entropy at the mean logits, and averaging probabilities that of ``-log`` of the
mean probability: neither is the expected loss our attacks follow.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qrobust.errors import ConfigError

DEFAULT_EOT = 16  # draws per prediction / gradient for randomised models (Athalye et al. use 10-30)


def _check_eot(eot) -> int:
    if isinstance(eot, bool) or not isinstance(eot, int) or eot < 1:
        raise ConfigError(f"eot must be an integer >= 1 (draws averaged per step), got {eot!r}; use e.g. 16")
    return eot


class EOTWrapper(nn.Module):
    """``forward(x) = 1/n * sum_i log_softmax(model(x; omega_i))`` over ``eot = n`` draws of a randomised model.

    With ``batched=True`` the draws are one forward pass on ``x`` repeated ``n`` times (right for models
    that draw their randomness per sample or per element, as stochastic quantizers do); ``batched=False``
    runs ``n`` separate passes (models that draw one random choice per forward pass). The output is a
    log-probability-like score: ``cross_entropy`` / ``nll_loss`` of it is the mean of the per-draw
    cross-entropies, and its gradient the mean of the per-draw gradients (see the module docstring). Its
    argmax is the class with the largest geometric-mean probability over the draws.
    """

    def __init__(self, model: nn.Module, eot: int = DEFAULT_EOT, batched: bool = True):
        super().__init__()
        self.model = model
        self.eot = _check_eot(eot)
        self.batched = bool(batched)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, b = self.eot, x.shape[0]
        if self.batched:
            out = torch.log_softmax(self.model(x.repeat(n, *([1] * (x.dim() - 1)))), dim=-1)
            return out.view(n, b, *out.shape[1:]).mean(0)
        return torch.stack([torch.log_softmax(self.model(x), dim=-1) for _ in range(n)]).mean(0)

    def extra_repr(self) -> str:
        return f"eot={self.eot}, batched={self.batched}"


def is_randomised(model: nn.Module) -> bool:
    """True when the model holds a sampling stochastic quantizer (one not set to nearest-bin rounding)."""
    from qrobust.quant.stochastic import stochastic_quantizers

    return any(not sq.deterministic for sq in stochastic_quantizers(model))


def _model_attribute(model: nn.Module, name: str):
    """``model.<name>``, or that of the first submodule that has it (e.g. the QNet inside an SQ wrapper)."""
    for module in model.modules():
        value = getattr(module, name, None)
        if value is not None:
            return value
    return None


def to_art(model: nn.Module, *, eot: int | None = None, eot_batched: bool = True,
           input_shape: tuple[int, ...] | None = None, num_classes: int | None = None):
    """An ART ``PyTorchClassifier`` for a qrobust model (inputs in [0, 1], normalisation inside the model).

    ``clip_values=(0, 1)`` and no ART preprocessing; ``input_shape`` (C, H, W) and ``num_classes`` come
    from the model (:func:`qrobust.models.build_model` records them) unless given. Deterministic models
    (float, QAT twins: attacks follow their straight-through gradients) are handed over as they are,
    with ``CrossEntropyLoss`` on their logits. Randomised models (sampling stochastic quantizers, or any
    model when ``eot > 1`` is given) are wrapped in :class:`EOTWrapper` with ``eot`` draws (default
    :data:`DEFAULT_EOT`) and ``NLLLoss``: ART's predictions are then the mean log-probabilities over the
    draws and its loss gradients exactly our EOT gradients (module docstring). ``eot=1`` on a randomised
    model attacks single draws, with a warning.

    The classifier holds ``model`` itself (no copy): ART puts it in eval mode for predictions and
    gradients (``training_mode=False``), and moves it to its device (the one the model's parameters are
    on). Raises :class:`~qrobust.errors.ConfigError` when ART is not installed.
    """
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        raise ConfigError("qrobust.interop.to_art needs the Adversarial Robustness Toolbox: "
                          "pip install qrobust[art] (or pip install adversarial-robustness-toolbox)") from None
    input_shape = tuple(input_shape or _model_attribute(model, "input_shape") or ())
    num_classes = num_classes or _model_attribute(model, "num_classes")
    if not input_shape or not num_classes:
        raise ConfigError("to_art needs input_shape=(C, H, W) and num_classes for a model that does not carry "
                          "them (models from qrobust.models.build_model do)")
    randomised = is_randomised(model)
    eot = _check_eot(eot) if eot is not None else (DEFAULT_EOT if randomised else 1)
    if randomised and eot == 1:
        warnings.warn("to_art: the model is randomised but eot=1, so ART attacks single draws and overestimates "
                      "robustness; pass eot=N (e.g. 16)", stacklevel=2)
    if eot > 1:
        wrapped, loss = EOTWrapper(model, eot, eot_batched), nn.NLLLoss()
    else:
        wrapped, loss = model, nn.CrossEntropyLoss()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return PyTorchClassifier(wrapped, loss=loss, input_shape=input_shape, nb_classes=int(num_classes),
                             clip_values=(0.0, 1.0), channels_first=True,
                             device_type="gpu" if device.type == "cuda" else "cpu")


__all__ = ["DEFAULT_EOT", "EOTWrapper", "is_randomised", "to_art"]
