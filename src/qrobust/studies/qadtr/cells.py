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
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrobust.attacks.patch import (
    ANYWHERE,
    PatchAttack,
    PatchConfig,
    attack_success_rate,
    make_patch_attack,
    patch_mask,
    train_patch,
)
from qrobust.attacks.whitebox import input_gradient
from qrobust.metrics import accuracy, accuracy_and_tie_rate
from qrobust.quant import RandomPrecision, set_bit_width
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


def _patch_attack(cfg: StudyConfig, name: str, spec: PatchConfig, steps: int) -> PatchAttack:
    """The registered patch attack ``name`` (``qrobust.registry.PATCH_ATTACKS``) with the study's settings."""
    a = cfg.attack
    return make_patch_attack(name, spec, **({} if name == "random" else {"steps": steps, "lr": a.lr,
                                                                          "batch_size": a.batch_size}))


def transfer_row(ctx: dict, cfg: StudyConfig, source: str, steps: int, switched: bool = False,
                 attack: str = "universal") -> dict[str, float]:
    """One row of :func:`qrobust.attacks.patch.patch_transfer_matrix`: a patch made on ``source`` by the patch
    attack ``attack`` (fresh generator seeded ``seed``, ``steps`` Adam steps) and its ASR on every target
    (fresh generator seeded ``seed + 1`` each, so every target sees the same places)."""
    a, d, seed = cfg.attack, ctx["data"], ctx["seed"]
    patch_attack = _patch_attack(cfg, attack, replace(cfg.seen_specs()[0], region=ANYWHERE), steps)
    models = _table1_models(ctx, cfg, switched)
    with widths_kept(ctx["models"]):
        patch_attack.fit(_get(models[source]), d["attack_x"], d["attack_y"], generator=torch.Generator().manual_seed(seed))
        return {tgt: patch_attack.evaluate(_get(m), d["test_x"], d["test_y"], draws=a.draws,
                                           generator=torch.Generator().manual_seed(seed + 1))["asr"]
                for tgt, m in models.items()}


def table1_clean(ctx: dict, cfg: StudyConfig) -> dict:
    """Clean accuracy and tie rate per width, and the ASR of the random patch (the ``"random"`` attack)."""
    models = ctx["models"]
    return {"image_hw": list(ctx["data"]["test_x"].shape[-2:]),
            "clean_acc": {w: clean_accuracy(ctx, models[w]) for w in cfg.widths()},
            "tie_rate": {w: tie_rate(ctx, models[w]) for w in cfg.widths()},
            "random_patch_asr": transfer_row(ctx, cfg, "32", steps=0, attack="random")}


def table1_switched_clean(ctx: dict, cfg: StudyConfig) -> dict:
    """Clean accuracy of the 8-bit QAT model switched to each width."""
    base = ctx["models"]["8"]
    with widths_kept(ctx["models"]):
        return {"clean_acc_switched": {str(b): clean_accuracy(ctx, set_bit_width(base, b)) for b in cfg.qat.bits}}


# --------------------------------------------------------------------------------------------------
# Table 2: a defense at one width, seen/unseen patches, transfer/adaptive
# --------------------------------------------------------------------------------------------------


def _transfer_patch(ctx: dict, cfg: StudyConfig, get: Callable[[], nn.Module], name: str, spec: PatchConfig,
                    ) -> Tensor:
    """The patch made on the float model for Table 2's patch ``name`` (the attacker does not know the defense)."""
    return ctx["float_patches"][name]


def _adaptive_patch(ctx: dict, cfg: StudyConfig, get: Callable[[], nn.Module], name: str, spec: PatchConfig,
                    on_step: Callable[[int, Tensor], None] | None = None) -> Tensor:
    """A universal patch made against the defended model at this width (``rand``: a random width per step),
    optimised over the places it is evaluated on (``spec.region``), with ``attack.adaptive_steps`` >= the
    transfer patch's steps."""
    d = ctx["data"]
    attack = _patch_attack(cfg, "universal", spec, cfg.attack.adaptive_steps)
    gen = torch.Generator().manual_seed(ctx["seed"] + 2)
    if on_step is None:
        return attack.fit(get(), d["attack_x"], d["attack_y"], generator=gen)
    c = attack.config
    return train_patch(get(), d["attack_x"], d["attack_y"], spec, steps=c.steps, lr=c.lr, batch_size=c.batch_size,
                       generator=gen, on_step=on_step)


# Table 2's threat models: name -> (ctx, cfg, model view, patch name, spec) -> patch. A new one is a function
# and a line.
TABLE2_ATTACKS: dict[str, Callable[..., Tensor]] = {
    "transfer": _transfer_patch,
    "adaptive": _adaptive_patch,
}


def table2_attacks(cfg: StudyConfig) -> list[str]:
    return ["transfer", "adaptive"] if cfg.attack.adaptive else ["transfer"]


def _asr(ctx: dict, cfg: StudyConfig, model: nn.Module, patch: Tensor, spec: PatchConfig) -> float:
    d = ctx["data"]
    gen = torch.Generator().manual_seed(ctx["seed"] + 1)
    places = [spec.locations(len(d["test_y"]), d["test_x"].shape[-2:], gen).to(d["test_x"].device)
              for _ in range(cfg.attack.draws)]
    return attack_success_rate(model, d["test_x"], d["test_y"], patch, spec, draws=cfg.attack.draws,
                               batch_size=eval_batch(model), locations=places,
                               generator=torch.Generator().manual_seed(ctx["seed"] + 5))["asr"]


def table2_row(ctx: dict, cfg: StudyConfig, name: str, width: str) -> dict:
    """Clean accuracy, tie rate and ASR per Table-2 patch (seen; unseen size, shape, place, all) and attack
    of defense ``name`` at ``width``; ``<attack>_seen`` averages the seen sizes."""
    get = view(ctx, cfg, name, width)
    row: dict[str, Any] = {}
    with widths_kept(ctx["defended"]):
        row |= {"clean_acc": clean_accuracy(ctx, get()), "tie_rate": tie_rate(ctx, get()), "per_spec": {}}
        for key, spec in cfg.table2_specs().items():
            row["per_spec"][key] = {attack: _asr(ctx, cfg, get(), TABLE2_ATTACKS[attack](ctx, cfg, get, key, spec), spec)
                                    for attack in table2_attacks(cfg)}
        for attack in table2_attacks(cfg):
            row[f"{attack}_seen"] = _nanmean([row["per_spec"][f"seen:{s.key}"][attack] for s in cfg.seen_specs()])
            for key in cfg.unseen_specs():
                row[f"{attack}_{key}"] = row["per_spec"][key][attack]
    return row


def steps_curve(ctx: dict, cfg: StudyConfig, name: str) -> dict:
    """Adaptive ASR on the seen patch against the number of Adam steps (adaptive_steps / 4, / 2, x1, x2), one
    run, for defense ``name`` at its training width: has the adaptive attack saturated?"""
    s = cfg.attack.adaptive_steps
    marks = sorted({max(1, s // 4), max(1, s // 2), s, 2 * s})
    key, spec = next(iter(cfg.table2_specs().items()))
    width = str(cfg.defense.train_bits)
    get = view(ctx, cfg, name, width)
    curve: dict[str, float] = {}
    with widths_kept(ctx["defended"]):
        def on_step(t: int, patch: Tensor) -> None:
            if t in marks:
                curve[str(t)] = _asr(ctx, cfg, get(), patch, spec)

        longer = replace(cfg, attack=replace(cfg.attack, adaptive_steps=2 * s))
        _adaptive_patch(ctx, longer, get, key, spec, on_step=on_step)
    return {"width": width, "patch": key, "asr": curve}


# --------------------------------------------------------------------------------------------------
# The reader's figures: ASR against patch size per width, ASR over patch positions
# --------------------------------------------------------------------------------------------------


def size_curve(ctx: dict, cfg: StudyConfig, width: str) -> dict:
    """ASR of a patch made on the ``width`` model itself (white-box, ``attack.steps``, random places
    anywhere) for each size of ``patches.size_curve``, with the share of the image it really covers."""
    a, d, seed = cfg.attack, ctx["data"], ctx["seed"]
    model = ctx["models"][width]
    out: dict[str, dict[str, float]] = {}
    with widths_kept(ctx["models"]):
        for size in cfg.patches.size_curve:
            spec = PatchConfig(cfg.patches.shape, size)
            attack = _patch_attack(cfg, "universal", spec, a.steps)
            attack.fit(model, d["attack_x"], d["attack_y"], generator=torch.Generator().manual_seed(seed))
            res = attack.evaluate(model, d["test_x"], d["test_y"], draws=a.draws,
                                  generator=torch.Generator().manual_seed(seed + 1))
            out[f"{size:g}"] = {"asr": res["asr"], "area": patch_area(spec, d["test_x"].shape[-2:])}
    return out


def patch_area(spec: PatchConfig, image_hw: tuple[int, int]) -> float:
    """The share of the image the patch's mask really covers (its side is a whole number of pixels)."""
    _, mask = patch_mask(spec, tuple(image_hw))
    return float(mask.sum()) / (image_hw[0] * image_hw[1])


def heatmap(ctx: dict, cfg: StudyConfig) -> dict:
    """ASR of one fixed patch (made on the float model with Table 1's settings, random places anywhere)
    pasted at each place of a ``heatmap_grid`` x ``heatmap_grid`` grid of top-left positions, on the float
    and every QAT model (the paper's spatial sensitivity)."""
    a, d, seed, g = cfg.attack, ctx["data"], ctx["seed"], cfg.attack.heatmap_grid
    spec = replace(cfg.seen_specs()[0], region=ANYWHERE)
    attack = _patch_attack(cfg, "universal", spec, a.steps)
    patch = attack.fit(ctx["models"]["32"], d["attack_x"], d["attack_y"], generator=torch.Generator().manual_seed(seed))
    h, w = d["test_x"].shape[-2:]
    side = patch.shape[-1]
    rows = [round(i * (h - side) / (g - 1)) for i in range(g)]
    cols = [round(j * (w - side) / (g - 1)) for j in range(g)]
    out: dict[str, dict[str, float]] = {}  # width -> "row,col" -> ASR (dicts: averaged over seeds)
    with widths_kept(ctx["models"]):
        for width in cfg.widths():
            model = ctx["models"][width]
            out[width] = {f"{r},{c}": attack_success_rate(model, d["test_x"], d["test_y"], patch,
                                                          replace(spec, placement="fixed", location=(r, c)),
                                                          batch_size=eval_batch(model))["asr"]
                          for r in rows for c in cols}
    return {"rows": rows, "cols": cols, "side": side, "asr": out}


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
