"""The card's only contact with the attack, defense and export families: one small function each.

Everything here goes through the public API (``import qrobust as qr``) with the documented signatures,
so when a family is refactored only its adapter needs re-pointing. Each adapter runs its attack in eval
mode on the models it is given and leaves them as it found them.
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import Tensor, nn

import qrobust as qr
from qrobust.utils import eval_mode


def _chunks(n: int, size: int = 256) -> list[slice]:
    return [slice(i, i + size) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------------- white-box
def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int, eot: int, eot_batched: bool,
         seed: int) -> Tensor:
    """APGD-CE (Croce & Hein 2020), L-inf, one restart, EOT over ``eot`` draws (``qr.apgd_ce``)."""
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the set-up checks run once, in gradient_checks
        return torch.cat([qr.apgd_ce(model, x[s], y[s], eps, steps=steps, eot=eot, eot_batched=eot_batched,
                                     generator=gen, check=False) for s in _chunks(len(y))])


def square(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, queries: int, randomised: bool,
           seed: int) -> Tensor:
    """Square Attack (Andriushchenko et al. 2020), L-inf, score-based (``qr.square_attack``); paired
    common-random-number steps for randomised models. ``p_init`` is the paper's MNIST value (0.8) for
    one-channel images and its CIFAR value (0.05) otherwise."""
    gen = torch.Generator().manual_seed(seed)
    p_init = 0.8 if x.shape[1] == 1 else 0.05
    with eval_mode(model):
        return torch.cat([qr.square_attack(model, x[s], y[s], eps, queries=queries, p_init=p_init,
                                           common_noise=randomised, generator=gen) for s in _chunks(len(y))])


class BPDA(nn.Module):
    """BPDA (Athalye et al. 2018): the forward value of ``model``, the gradient of ``stand_in``.

    ``forward(x) = stand_in(x) + (model(x) - stand_in(x)).detach()``: an attack sees the deployed model's
    outputs and follows the differentiable stand-in's input gradient (for a qrobust model: the same
    weights with every quantizer off)."""

    def __init__(self, model: nn.Module, stand_in: nn.Module):
        super().__init__()
        self.model, self.stand_in = model, stand_in

    def forward(self, x: Tensor) -> Tensor:
        approx = self.stand_in(x)
        with torch.no_grad():
            exact = self.model(x)
        return approx + (exact - approx).detach()


def bpda(model: nn.Module, stand_in: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int, eot: int,
         eot_batched: bool, seed: int) -> Tensor:
    """APGD-CE through :class:`BPDA` (deployed forward, stand-in gradient)."""
    with eval_mode(model, stand_in):
        return apgd(BPDA(model, stand_in), x, y, eps, steps=steps, eot=eot, eot_batched=eot_batched, seed=seed)


def gradient_checks(model: nn.Module, x: Tensor, y: Tensor, eot: int) -> list[str]:
    """AutoAttack-style set-up checks (``check_attack_setup``): masked gradients, softmax outputs, ..."""
    from qrobust.attacks.whitebox import check_attack_setup

    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return check_attack_setup(model, x, y, eot)


# ------------------------------------------------------------------------------------------- patches
def train_patch(model: nn.Module, x: Tensor, y: Tensor, size: float, *, steps: int, batch: int,
                seed: int) -> tuple[Tensor, list[str]]:
    """An untargeted universal square patch of ``size`` (area share) at random places (Brown et al. 2017,
    ``qr.train_patch``, Adam lr 0.05); ``steps=0`` is the random-noise patch. Returns the patch and the
    warnings it raised (e.g. a zero patch gradient: masking)."""
    cfg = qr.PatchConfig(shape="square", size=size, placement="random")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch = qr.train_patch(model, x, y, cfg, steps=steps, lr=0.05, batch_size=batch,
                               generator=torch.Generator().manual_seed(seed))
    return patch, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def patch_asr(model: nn.Module, x: Tensor, y: Tensor, patch: Tensor, size: float, *, placements: int,
              seed: int) -> dict:
    """``qr.attack_success_rate``: ``{"asr", "num_eligible", "clean_acc"}`` over ``placements`` random
    places per image (the same places for every patch and model of one seed)."""
    cfg = qr.PatchConfig(shape="square", size=size, placement="random")
    return qr.attack_success_rate(model, x, y, patch, cfg, draws=placements,
                                  generator=torch.Generator().manual_seed(seed))


def paste_patch(x: Tensor, patch: Tensor, size: float) -> Tensor:
    """``x`` with ``patch`` pasted at the image centre (the card's example pictures)."""
    cfg = qr.PatchConfig(shape="square", size=size, placement="fixed")
    return qr.apply_patch(x, patch, cfg)[0]


# ------------------------------------------------------------------------------------------- extraction
def calibrate_dcp(probs: Tensor, labels: Tensor, l1_budget: float, gamma: float, nu: float) -> tuple[dict, float]:
    """The strongest DCP (``qr.calibrate_defense``: largest beta) with mean l1 <= ``l1_budget`` on ``probs``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the card reports the defender's accuracy itself
        return qr.calibrate_defense("dcp", probs, l1_budget, fixed={"gamma": gamma, "nu": nu}, labels=labels)


def victim(model: nn.Module, defense_params: dict | None, queries: int):
    """A ``qr.Victim`` answering probabilities, DCP-defended when ``defense_params`` is given."""
    defense = qr.make_defense("dcp", **defense_params) if defense_params is not None else None
    return qr.Victim(model, defense=defense, budget=queries)


def knockoff(victim_, clone: nn.Module, transfer: Tensor, *, queries: int, epochs: int, seed: int,
             eval_data: tuple[Tensor, Tensor]) -> dict:
    """KnockoffNets (Orekondy et al. 2019), random sampling, soft answers, SGD (lr 0.02, momentum 0.9,
    batch 128) as the divqat study's: ``{"clone_acc", "history"}`` (clone accuracy per epoch)."""
    attack = qr.KnockoffNets(victim_, clone, sampling="random", batch_size=128, epochs=epochs, optimizer="sgd",
                             lr=0.02, momentum=0.9, seed=seed)
    result = attack.run(transfer, num_queries=queries, eval_data=eval_data)
    return {"clone_acc": result.final_accuracy, "history": [list(h) for h in result.history],
            "queries_used": result.queries_used}


def agreement(clone: nn.Module, reference: nn.Module, x: Tensor) -> float:
    from qrobust.attacks.extraction.metrics import agreement as _agreement

    return _agreement(clone, reference, x)


# ------------------------------------------------------------------------------------------- deployment
def int8_torch(model: nn.Module) -> tuple[nn.Module, int]:
    """torch.ao int8 modules (``qr.export_int8``) and the bytes of their state dict."""
    int8 = qr.export_int8(model)
    buffer = io.BytesIO()
    torch.save(int8.state_dict(), buffer)
    return int8, len(buffer.getvalue())


def int8_onnx(model: nn.Module) -> tuple[nn.Module, int]:
    """A QDQ ONNX graph run by ONNX Runtime (``qr.export_onnx`` + ``qr.OrtModel``) and its bytes."""
    proto = qr.export_onnx(model)
    return qr.OrtModel(proto), len(proto.SerializeToString())
