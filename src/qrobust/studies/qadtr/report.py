"""The QADT-R study's report: ``results.md`` (Tables 1 and 2, gradient and feature analysis), the study's
figures (``transfer_matrix.png``, ``table2_asr.png``) and each seed's (``gradient_maps.png``,
``feature_maps.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qrobust import plotstyle
from qrobust.experiment.engine import compute_seconds
from qrobust.studies.qadtr.cells import input_grad, layer_outputs, patch_area
from qrobust.studies.qadtr.config import StudyConfig
from qrobust.studies.qadtr.defenses import LABELS
from qrobust.studies.tables import fmt, mean_of

FACTORS = ("seen", "unseen_size", "unseen_shape", "unseen_place", "unseen_all")
FACTOR_LABELS = {"seen": "seen", "unseen_size": "new size", "unseen_shape": "new shape",
                 "unseen_place": "new place", "unseen_all": "all new"}
KINDS = tuple(f"{a}_{f}" for a in ("transfer", "adaptive") for f in FACTORS)


def _pct(cell: Any, seeds: int) -> str:
    return fmt(cell, seeds)


def _num(cell: Any, seeds: int) -> str:
    """3 significant digits (gradient and feature tables)."""
    return fmt(cell, seeds, percent=False, spec=".3g")


def results_markdown(cfg: StudyConfig, results: dict) -> str:
    t1, t2, grads, feats = results["table1"], results["table2"], results["gradients"], results["features"]
    seeds = len(cfg.seeds)
    widths = cfg.widths()
    seen_spec = cfg.seen_specs()[0]
    hw = _image_hw(results)
    seen = ", ".join(_describe(s, hw) for s in cfg.seen_specs())
    unseen = "; ".join(f"{FACTOR_LABELS[k]}: {_describe(s, hw)} at places {list(s.region)}"
                       for k, s in cfg.unseen_specs().items())
    lines = [
        f"# QADT-R patch study: {cfg.name}",
        "",
        f"{cfg.data.name}, {cfg.model.arch} (width {cfg.model.width}), seeds {cfg.seeds}; "
        "ASR in % (untargeted, on clean-correct held-out test images, "
        f"{cfg.attack.draws} placement draw(s) per image){'; mean ± std over seeds' if seeds > 1 else ''}. "
        f"Compute time of all stages (summed over calls and seeds): {compute_seconds(results) / 60:.1f} min.",
        "",
        f"## Table 1: patch transfer across bit widths ({_describe(seen_spec, hw)}, "
        f"{cfg.attack.steps} Adam steps, random places anywhere)",
        "",
        "| source \\ target | " + " | ".join(f"{w}-bit" for w in widths) + " |",
        "|---|" + "---|" * len(widths),
        "| clean accuracy | " + " | ".join(_pct(t1["clean_acc"][w], seeds) for w in widths) + " |",
        "| tie rate (top-1 logit tied) | " + " | ".join(
            _pct(t1["tie_rate"][w], seeds) if "tie_rate" in t1 else "-" for w in widths) + " |",
    ]
    for src in widths:
        lines.append(f"| patch from {src}-bit | " + " | ".join(_pct(t1["asr"][src][w], seeds) for w in widths) + " |")
    lines.append("| random patch (0 steps) | " + " | ".join(_pct(t1["random_patch_asr"][w], seeds) for w in widths)
                 + " |")
    if "asr_switched" in t1:
        lines += ["", "One 8-bit QAT model switched between widths (clean accuracy, then ASR):", "",
                  "| source \\ target | " + " | ".join(f"{w}-bit" for w in widths) + " |",
                  "|---|" + "---|" * len(widths),
                  "| clean accuracy | " + _pct(t1["clean_acc"]["32"], seeds) + " | "
                  + " | ".join(_pct(t1["clean_acc_switched"][w], seeds) for w in widths[1:]) + " |"]
        for src in widths:
            lines.append(f"| patch from {src}-bit | "
                         + " | ".join(_pct(t1["asr_switched"][src][w], seeds) for w in widths) + " |")
    lines += [
        "",
        "## Table 2: defenses x bit width",
        "",
        f"Seen = {seen} at places in the training region {cfg.patches.region}. Unseen changes one factor at a "
        f"time, then all three: {unseen}. Every patch is optimised over the places it is evaluated on. "
        f"Transfer = patch made on the float model ({cfg.attack.steps} steps); adaptive = patch made against the "
        f"defended model at that width ({cfg.attack.adaptive_steps} steps; `rand` = random precision "
        "inference: the attack sees a random width per step, and each test image is judged clean and patched "
        "under one width drawn for it). Lower ASR is better.",
    ]
    for attack in ("transfer", "adaptive"):
        kinds = [f"{attack}_{f}" for f in FACTORS]
        if not any(k in row for per in t2.values() for row in per.values() for k in kinds):
            continue
        lines += ["", f"{attack.capitalize()} ASR:", "",
                  "| defense | width | clean acc | tie rate | " + " | ".join(FACTOR_LABELS[f] for f in FACTORS) + " |",
                  "|---|---|---|---|" + "---|" * len(FACTORS)]
        for name in cfg.defense.names:
            for width, row in t2.get(name, {}).items():
                cells = [_pct(row["clean_acc"], seeds), _pct(row["tie_rate"], seeds) if "tie_rate" in row else "-"]
                cells += [_pct(row[k], seeds) if k in row else "-" for k in kinds]
                lines.append(f"| {LABELS[name]} | {width} | " + " | ".join(cells) + " |")
    lines += _defense_sentences(cfg, t2, seeds)
    lines += _patched_accuracy_markdown(cfg, t2, seeds)
    lines += _figures_markdown(cfg, results.get("figures", {}), seeds)
    lines += _analysis_markdown(cfg, grads, feats, seeds)
    return "\n".join(lines)


def _patched_accuracy_markdown(cfg: StudyConfig, t2: dict, seeds: int) -> list[str]:
    """Accuracy under the patch (clean accuracy x (1 - ASR)) per defense and width: higher is better."""
    kinds = ["transfer_seen"] + [f"adaptive_{f}" for f in FACTORS]
    if not any(f"patched_acc_{k}" in row for per in t2.values() for row in per.values() for k in kinds):
        return []
    lines = ["", "Accuracy under the patch, % of all test images (correct clean *and* under the patch = clean "
             "accuracy x (1 - ASR); higher is better). ASR is measured on each model's own clean-correct images, "
             "so a defense that lowers ASR by losing clean accuracy shows here, not in the ASR tables:", "",
             "| defense | width | clean acc | transfer seen | " + " | ".join(f"adaptive {FACTOR_LABELS[f]}" for f in FACTORS)
             + " |", "|---|---|---|---|" + "---|" * len(FACTORS)]
    for name in cfg.defense.names:
        for width, row in t2.get(name, {}).items():
            cells = [_pct(row["clean_acc"], seeds)]
            cells += [_pct(row[f"patched_acc_{k}"], seeds) if f"patched_acc_{k}" in row else "-" for k in kinds]
            lines.append(f"| {LABELS[name]} | {width} | " + " | ".join(cells) + " |")
    return lines


def _image_hw(results: dict) -> tuple[int, int]:
    h, w = results["table1"].get("image_hw", [28, 28])
    return int(h), int(w)


def _describe(spec, hw: tuple[int, int]) -> str:
    """E.g. ``square 10x10 px = 12.8% of the image (size 0.14)``: the area the mask really covers."""
    from qrobust.attacks.patch import patch_mask

    side, _ = patch_mask(spec, hw)
    return f"{spec.shape} {side}x{side} px = {100 * patch_area(spec, hw):.1f}% of the image (size {spec.size:g})"


def _defense_sentences(cfg: StudyConfig, t2: dict, seeds: int) -> list[str]:
    """One sentence per defense at its training width: what it buys (ASR) and costs (clean accuracy)."""
    width = str(cfg.defense.train_bits)
    base = t2.get("none", {}).get(width)
    if base is None:
        return []
    lines = ["", f"What each defense buys and costs at {width} bits (against the undefended {width}-bit QAT model):", ""]
    for name in cfg.defense.names:
        row = t2.get(name, {}).get(width)
        if name == "none" or row is None:
            continue
        parts = []
        for k, label in (("transfer_seen", "seen transfer"), ("transfer_unseen_all", "unseen (all new) transfer"),
                         ("adaptive_seen", "seen adaptive")):
            if k in row and k in base:
                parts.append(f"{label} ASR {_pct(row[k], seeds)} vs {_pct(base[k], seeds)} "
                             f"({100 * (mean_of(row[k]) - mean_of(base[k])):+.1f} points)")
        parts.append(f"clean accuracy {_pct(row['clean_acc'], seeds)} vs {_pct(base['clean_acc'], seeds)} "
                     f"({100 * (mean_of(row['clean_acc']) - mean_of(base['clean_acc'])):+.1f} points)")
        lines.append(f"- **{LABELS[name]}**: " + "; ".join(parts) + ".")
    return lines


def _figures_markdown(cfg: StudyConfig, figs: dict, seeds: int) -> list[str]:
    lines: list[str] = []
    if "steps_curve" in figs:
        marks = sorted({int(k) for per in figs["steps_curve"].values() for k in per["asr"]})
        lines += ["", f"## Adaptive ASR against Adam steps (seen patch, each defense at {cfg.defense.train_bits} bits; "
                  f"Table 2 uses {cfg.attack.adaptive_steps})", "",
                  "| defense | " + " | ".join(f"{m} steps" for m in marks) + " |", "|---|" + "---|" * len(marks)]
        for name, per in figs["steps_curve"].items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(_pct(per["asr"][str(m)], seeds) if str(m) in per["asr"]
                                                           else "-" for m in marks) + " |")
    if "size_curve" in figs:
        sizes = list(next(iter(figs["size_curve"].values())))
        areas = [mean_of(next(iter(figs["size_curve"].values()))[s]["area"]) for s in sizes]
        lines += ["", f"## ASR against patch size (white-box patch made on each model, {cfg.attack.steps} steps, "
                  "random places; see size_curve.png)", "",
                  "| model | " + " | ".join(f"{100 * a:.1f}% of the image" for a in areas) + " |",
                  "|---|" + "---|" * len(sizes)]
        for w, per in figs["size_curve"].items():
            lines.append(f"| {w}-bit | " + " | ".join(_pct(per[s]["asr"], seeds) for s in sizes) + " |")
    if "heatmap" in figs:
        hm = figs["heatmap"]
        lines += ["", f"## ASR over patch positions (the float model's patch at a {len(hm['rows'])}x{len(hm['cols'])} "
                  "grid of fixed places; see heatmap.png)", "",
                  "| model | mean | min | max |", "|---|---|---|---|"]
        for w, per in hm["asr"].items():
            vals = [mean_of(v) for v in per.values()]
            lines.append(f"| {w}-bit | {100 * sum(vals) / len(vals):.1f} | {100 * min(vals):.1f} | {100 * max(vals):.1f} |")
    return lines


def _analysis_markdown(cfg: StudyConfig, grads: dict, feats: dict, seeds: int) -> list[str]:
    bits = cfg.qat.bits
    lines = [
        "",
        "## Gradient analysis: float vs quantized input gradients",
        "",
        f"Mean per-image cosine similarity and MSE between grad_x CE of the float model and of the QAT model, "
        f"on {mean_of(grads['num_images']):.0f} "
        f"test images: clean, with the float model's patch, and after PGD (L-inf {cfg.analysis.pgd_eps:g}, "
        f"{cfg.analysis.pgd_steps} steps, made on the float model).",
        "",
        "| input | " + " | ".join(f"cos 32 vs {b}" for b in bits) + " | " + " | ".join(f"MSE 32 vs {b}" for b in bits)
        + " |",
        "|---|" + "---|" * (2 * len(bits)),
    ]
    for attack, per in grads["float_vs_quantized"].items():
        lines.append(f"| {attack} | " + " | ".join(_num(per[str(b)]["cos"], seeds) for b in bits)
                     + " | " + " | ".join(_num(per[str(b)]["mse"], seeds) for b in bits) + " |")
    align = grads["defense_width_alignment"]
    keys = sorted({k for per in align.values() for k in per})
    if keys:
        lines += ["", "Input-gradient cosine between a defense's own widths (lower = less aligned; GIR's target):",
                  "", "| defense | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, per in align.items():
            lines.append(f"| {LABELS[name]} | " + " | ".join(_num(per[k], seeds) if k in per else "-" for k in keys)
                         + " |")
    shift = feats["relative_shift"]
    layer_keys = list(next(iter(shift.values())).keys())
    lines += ["", "## Feature maps: relative change ||F(x_patch) - F(x)|| / ||F(x)|| (see feature_maps.png)", "",
              "| width | " + " | ".join(layer_keys) + " |", "|---|" + "---|" * len(layer_keys)]
    for w, per in shift.items():
        lines.append(f"| {w}-bit | " + " | ".join(_num(per[k], seeds) for k in layer_keys) + " |")
    lines += ["", "Figures: transfer_matrix.png, table2_asr.png, size_curve.png, heatmap.png, seed-*/feature_maps.png, "
              "seed-*/gradient_maps.png.", ""]
    return lines


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")  # constrained: labels and colour bars fit


def _save(fig, path: Path) -> None:
    plotstyle.save_png(fig, path)


@plotstyle.styled
def study_figures(cfg: StudyConfig, results: dict, root: Path) -> None:
    """``transfer_matrix.png`` (Table 1 as a heat map) and ``table2_asr.png`` (Table 2's ASRs as bars)."""
    widths = cfg.widths()
    t1 = results["table1"]
    fig = _figure(4.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    grid = [[100 * mean_of(t1["asr"][s][t]) for t in widths] for s in widths]
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="magma")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=9)
    ax.set_xticks(range(len(widths)), [f"{w}" for w in widths])
    ax.set_yticks(range(len(widths)), [f"{w}" for w in widths])
    ax.set_xlabel("target bits")
    ax.set_ylabel("source bits")
    ax.set_title("patch ASR (%)")
    ax.grid(False)  # no grid lines over the cells
    fig.colorbar(im, ax=ax)
    _save(fig, root / "transfer_matrix.png")

    t2 = results["table2"]
    kinds = [k for k in KINDS if any(k in row for per in t2.values() for row in per.values())]
    labels, values = [], {k: [] for k in kinds}
    for name in cfg.defense.names:
        for width, row in t2.get(name, {}).items():
            labels.append(f"{name} @ {width}")
            for k in kinds:
                values[k].append(100 * mean_of(row[k]) if k in row else float("nan"))
    fig = _figure(max(6.0, 0.5 * len(labels)), 4.6)
    ax = fig.add_subplot(1, 1, 1)
    step = 0.8 / max(1, len(kinds))
    factor_colors = dict(zip(FACTORS, plotstyle.colors(len(FACTORS)), strict=True))
    for i, k in enumerate(kinds):  # colour = patch factor, hatched = adaptive (10 kinds: colours alone would repeat)
        attack, factor = k.split("_", 1)
        ax.bar([j + i * step for j in range(len(labels))], values[k], width=step, label=k.replace("_", " "),
               color=factor_colors[factor], hatch="////" if attack == "adaptive" else None, edgecolor="white",
               linewidth=0.3)
    ax.set_xticks([j + 0.4 - step / 2 for j in range(len(labels))], labels, rotation=55, ha="right",
                  rotation_mode="anchor")
    ax.set_xlim(-0.5, len(labels) - 0.1)
    ax.set_ylabel("ASR (%)")
    plotstyle.legend_below(fig, *ax.get_legend_handles_labels())
    _save(fig, root / "table2_asr.png")
    _reader_figures(cfg, results.get("figures", {}), root)


def _reader_figures(cfg: StudyConfig, figs: dict, root: Path) -> None:
    """``size_curve.png`` (ASR against patch area per width, the paper's 70% line) and ``heatmap.png``."""
    if "size_curve" in figs:
        fig = _figure(4.6, 3.4)
        ax = fig.add_subplot(1, 1, 1)
        for w, per in figs["size_curve"].items():
            sizes = list(per)
            ax.plot([100 * mean_of(per[s]["area"]) for s in sizes], [100 * mean_of(per[s]["asr"]) for s in sizes],
                    marker="o", label=f"{w}-bit")
        ax.axhline(70, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel("patch area (% of the image)")
        ax.set_ylabel("ASR (%)")
        ax.set_ylim(0, 100)
        plotstyle.legend_below(fig, *ax.get_legend_handles_labels())
        _save(fig, root / "size_curve.png")
    if "heatmap" in figs:
        hm = figs["heatmap"]
        widths = list(hm["asr"])
        fig = _figure(2.3 * len(widths), 2.4)
        for i, w in enumerate(widths):
            grid = [[100 * mean_of(hm["asr"][w][f"{r},{c}"]) for c in hm["cols"]] for r in hm["rows"]]
            ax = fig.add_subplot(1, len(widths), i + 1)
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="magma")
            ax.set_xticks(range(len(hm["cols"])), hm["cols"])
            ax.set_yticks(range(len(hm["rows"])), hm["rows"])
            ax.set_title(f"{w}-bit")
            ax.grid(False)  # no grid lines over the cells
        fig.colorbar(im, ax=fig.axes, label="ASR (%)", fraction=0.02)  # axes: top-left positions (px)
        _save(fig, root / "heatmap.png")  # constrained layout: the bar spans all panels


@plotstyle.styled
def seed_figures(cfg: StudyConfig, ctx: dict, root: Path) -> None:
    """A seed's ``gradient_maps.png`` (|grad_x| of the first analysis image per width, patched and PGD
    inputs; paper Fig. 4) and ``feature_maps.png`` (first layers' channel means, clean vs patched; Fig. 3)."""
    inputs, models, widths = ctx["inputs"], ctx["models"], cfg.widths()
    attacks = ["patch", "pixel"]
    fig = _figure(2.0 * len(widths), 2.1 * len(attacks))
    for r, attack in enumerate(attacks):
        for c, w in enumerate(widths):
            g = input_grad(models[w], inputs[attack][:1], inputs["y"][:1])[0].abs().sum(0).cpu()
            ax = fig.add_subplot(len(attacks), len(widths), r * len(widths) + c + 1)
            ax.imshow(g.numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{attack}, {w}-bit", fontsize=9)
    _save(fig, root / "gradient_maps.png")

    layers = cfg.analysis.feature_layers
    maps = {}
    for w in widths:
        clean = layer_outputs(models[w], inputs["clean"], layers)
        patched = layer_outputs(models[w], inputs["patch"], layers)
        maps[w] = [(c[0].mean(0).cpu(), p[0].mean(0).cpu()) for c, p in zip(clean, patched, strict=True)]
    cols = 2 + 2 * len(next(iter(maps.values())))
    fig = _figure(1.6 * cols, 1.7 * len(widths))
    for r, w in enumerate(widths):
        panels = [("clean", inputs["clean"][0].mean(0).cpu()), ("patched", inputs["patch"][0].mean(0).cpu())]
        for i, (c, p) in enumerate(maps[w]):
            panels += [(f"L{i + 1} clean", c), (f"L{i + 1} patched", p)]
        for c_idx, (title, img) in enumerate(panels):
            ax = fig.add_subplot(len(widths), cols, r * cols + c_idx + 1)
            ax.imshow(img.numpy(), cmap="gray" if c_idx < 2 else "viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{w}-bit {title}" if c_idx == 0 else title, fontsize=8.5)
    _save(fig, root / "feature_maps.png")
