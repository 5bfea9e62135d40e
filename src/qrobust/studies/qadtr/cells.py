"""What one cell of the QADT-R study computes. Every function takes the seed's context (``ctx``, built
by :meth:`QADTRSpec.prepare`) and the config, seeds its own generators from ``ctx["seed"]`` and leaves
the context's models as it found them (mode, bit width).

``ctx``: ``seed``, ``device``, ``data`` (``attack_x/_y``: attacker images; ``test_x/_y``: held-out
test images), ``models`` (``"32"`` float, ``"<b>"`` QAT), ``defended`` (trained defenses),
``float_patches`` (spec key -> patch made on the float model) and ``inputs`` (the analysis images:
``clean``, ``patch``, ``pixel`` and their labels ``y``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.patch import PatchConfig, attack_success_rate, train_patch
from qrobust.attacks.whitebox import input_gradient
from qrobust.defenses.patch_training import PatchSpec, RandomPrecision, patch_asr
from qrobust.metrics import accuracy, accuracy_and_tie_rate
from qrobust.quant import set_bit_width
from qrobust.studies.qadtr.config import StudyConfig
from qrobust.studies.qadtr.defenses import evaluated_widths, view, widths_kept
from qrobust.utils import eval_mode


def eval_batch(model: nn.Module) -> int:
    """Random precision draws one width per forward: small batches give many draws per evaluation."""
    return 32 if isinstance(model, RandomPrecision) else 512


def clean_accuracy(ctx: dict, model: nn.Module) -> float:
    d = ctx["data"]
    return accuracy(model, d["test_x"], d["test_y"], eval_batch(model), ctx["device"])


def tie_rate(ctx: dict, model: nn.Module) -> float:
    d = ctx["data"]
    return accuracy_and_tie_rate(model, d["test_x"], d["test_y"], eval_batch(model), ctx["device"])["tie_rate"]


# --------------------------------------------------------------------------------------------------
# Table 1: bit-width transfer of a universal patch
# --------------------------------------------------------------------------------------------------


def _table1_models(ctx: dict, cfg: StudyConfig, switched: bool) -> dict[str, nn.Module | Callable[[], nn.Module]]:
    """Table 1's models by width; ``switched``: the QAT widths are one 8-bit model switched to each."""
    if not switched:
        return {w: ctx["models"][w] for w in cfg.widths()}
    base = ctx["models"]["8"]
    return {"32": ctx["models"]["32"]} | {str(b): (lambda b=b: set_bit_width(base, b)) for b in cfg.qat.bits}


def _get(entry: nn.Module | Callable[[], nn.Module]) -> nn.Module:
    return entry if isinstance(entry, nn.Module) else entry()


def transfer_row(ctx: dict, cfg: StudyConfig, source: str, steps: int, switched: bool = False) -> dict[str, float]:
    """One row of :func:`qrobust.attacks.patch.patch_transfer_matrix`: a patch made on ``source`` (fresh
    generator seeded ``seed``, ``steps`` Adam steps) and its ASR on every target (fresh generator
    seeded ``seed + 1`` each, so every target sees the same places)."""
    a, d, seed = cfg.attack, ctx["data"], ctx["seed"]
    spec = cfg.seen_specs()[0]
    pcfg = PatchConfig(spec.shape, spec.size, "random")
    models = _table1_models(ctx, cfg, switched)
    with widths_kept(ctx["models"]):
        patch = train_patch(_get(models[source]), d["attack_x"], d["attack_y"], pcfg, steps=steps, lr=a.lr,
                            batch_size=a.batch_size, progress=False, generator=torch.Generator().manual_seed(seed))
        return {tgt: attack_success_rate(_get(m), d["test_x"], d["test_y"], patch, pcfg, draws=a.draws,
                                         generator=torch.Generator().manual_seed(seed + 1))["asr"]
                for tgt, m in models.items()}


def table1_clean(ctx: dict, cfg: StudyConfig) -> dict:
    """Clean accuracy and tie rate per width, and the ASR of the random (0-step) patch."""
    models = ctx["models"]
    return {"clean_acc": {w: clean_accuracy(ctx, models[w]) for w in cfg.widths()},
            "tie_rate": {w: tie_rate(ctx, models[w]) for w in cfg.widths()},
            "random_patch_asr": transfer_row(ctx, cfg, "32", steps=0)}


def table1_switched_clean(ctx: dict, cfg: StudyConfig) -> dict:
    """Clean accuracy of the 8-bit QAT model switched to each width."""
    base = ctx["models"]["8"]
    with widths_kept(ctx["models"]):
        return {"clean_acc_switched": {str(b): clean_accuracy(ctx, set_bit_width(base, b)) for b in cfg.qat.bits}}


# --------------------------------------------------------------------------------------------------
# Table 2: a defense at one width, seen/unseen patches, transfer/adaptive
# --------------------------------------------------------------------------------------------------


def _transfer_patch(ctx: dict, cfg: StudyConfig, get: Callable[[], nn.Module], spec: PatchSpec) -> Tensor:
    """The patch made on the float model (the attacker does not know the defense)."""
    return ctx["float_patches"][spec.key]


def _adaptive_patch(ctx: dict, cfg: StudyConfig, get: Callable[[], nn.Module], spec: PatchSpec) -> Tensor:
    """A patch made against the defended model at this width (``rand``: a random width per step)."""
    a, d = cfg.attack, ctx["data"]
    return train_patch(get(), d["attack_x"], d["attack_y"], spec.config(), steps=a.adaptive_steps, lr=a.lr,
                       batch_size=a.batch_size, progress=False,
                       generator=torch.Generator().manual_seed(ctx["seed"] + 2))


# Table 2's patch attacks: name -> (ctx, cfg, model view, spec) -> patch. A new one is one function and a line.
PATCH_ATTACKS: dict[str, Callable[[dict, StudyConfig, Callable[[], nn.Module], PatchSpec], Tensor]] = {
    "transfer": _transfer_patch,
    "adaptive": _adaptive_patch,
}


def table2_attacks(cfg: StudyConfig) -> list[str]:
    return ["transfer", "adaptive"] if cfg.attack.adaptive else ["transfer"]


def _asr(ctx: dict, cfg: StudyConfig, model: nn.Module, patch: Tensor, spec: PatchSpec) -> float:
    d = ctx["data"]
    return patch_asr(model, d["test_x"], d["test_y"], patch, spec, draws=cfg.attack.draws,
                     batch_size=eval_batch(model), generator=torch.Generator().manual_seed(ctx["seed"] + 1))["asr"]


def table2_row(ctx: dict, cfg: StudyConfig, name: str, width: str) -> dict:
    """Clean accuracy, tie rate and ASR per patch spec and attack of defense ``name`` at ``width``."""
    get = view(ctx, cfg, name, width)
    row: dict[str, Any] = {}
    with widths_kept(ctx["defended"]):
        row |= {"clean_acc": clean_accuracy(ctx, get()), "tie_rate": tie_rate(ctx, get()), "per_spec": {}}
        for group, specs in (("seen", cfg.seen_specs()), ("unseen", cfg.unseen_specs())):
            for spec in specs:
                entry = {}
                for attack in table2_attacks(cfg):
                    entry[attack] = _asr(ctx, cfg, get(), PATCH_ATTACKS[attack](ctx, cfg, get, spec), spec)
                row["per_spec"][f"{group}:{spec.key}"] = entry
            for attack in table2_attacks(cfg):
                row[f"{attack}_{group}"] = _nanmean([row["per_spec"][f"{group}:{s.key}"][attack] for s in specs])
    return row


def _nanmean(values: list[float]) -> float:
    good = [v for v in values if not math.isnan(v)]
    return sum(good) / len(good) if good else float("nan")


# --------------------------------------------------------------------------------------------------
# Gradient and feature analysis
# --------------------------------------------------------------------------------------------------


def input_grad(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """grad_x of the per-image cross-entropy, in eval mode (the model's mode is restored)."""
    with eval_mode(model):
        return input_gradient(model, x, y)


def gradients_float(ctx: dict, cfg: StudyConfig) -> dict:
    """Cosine and MSE between the float model's input gradients and each QAT model's (paper Fig. 4)."""
    inputs, models = ctx["inputs"], ctx["models"]
    y = inputs["y"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for attack in ("clean", "patch", "pixel"):
        x = inputs[attack]
        g32 = input_grad(models["32"], x, y)
        out[attack] = {}
        for bits in cfg.qat.bits:
            gb = input_grad(models[str(bits)], x, y)
            cos = F.cosine_similarity(g32.flatten(1), gb.flatten(1), dim=1, eps=1e-12)
            out[attack][str(bits)] = {"cos": float(cos.mean()), "mse": float((g32 - gb).pow(2).mean())}
    return {"float_vs_quantized": out, "num_images": len(y)}


def gradients_alignment(ctx: dict, cfg: StudyConfig, name: str) -> dict[str, float]:
    """Cosine of input gradients between the widest and each other width of defense ``name`` (GIR's target)."""
    inputs = ctx["inputs"]
    widths = evaluated_widths(cfg, name)
    top = max(cfg.qat.bits)
    out: dict[str, float] = {}
    with widths_kept(ctx["defended"]):
        for hi, lo in [(top, b) for b in cfg.qat.bits if b != top]:
            if str(hi) not in widths or str(lo) not in widths:
                continue
            for attack in ("clean", "patch"):
                ga = input_grad(view(ctx, cfg, name, str(hi))(), inputs[attack], inputs["y"])
                gb = input_grad(view(ctx, cfg, name, str(lo))(), inputs[attack], inputs["y"])
                cos = F.cosine_similarity(ga.flatten(1), gb.flatten(1), dim=1, eps=1e-12)
                out[f"{attack}:{hi}v{lo}"] = float(cos.mean())
    return out


def layer_outputs(model: nn.Module, x: Tensor, layers: int) -> list[Tensor]:
    """Outputs of the first ``layers`` 4-D blocks of ``model.body`` (eval mode, no grad)."""
    blocks = [m for m in getattr(model, "body", nn.Sequential()).children()][:layers]
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for b in blocks]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [o for o in outs if o.dim() == 4]


def features(ctx: dict, cfg: StudyConfig) -> dict:
    """Per width, the relative change ``||F(x_p) - F(x)|| / ||F(x)||`` of the first layers (paper Fig. 3)."""
    inputs = ctx["inputs"]
    shift: dict[str, dict[str, float]] = {}
    for w in cfg.widths():
        clean = layer_outputs(ctx["models"][w], inputs["clean"], cfg.analysis.feature_layers)
        patched = layer_outputs(ctx["models"][w], inputs["patch"], cfg.analysis.feature_layers)
        shift[w] = {
            f"layer{i + 1}": float(((p - c).flatten(1).norm(dim=1) / c.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())
            for i, (c, p) in enumerate(zip(clean, patched, strict=True))
        }
    return {"relative_shift": shift, "num_images": len(inputs["y"])}
