"""The DivQAT study's report: ``results.md`` (the paper-style table: rows QAT / DivQAT(alpha) / DivQAT at
its operating point x defense; defender accuracy, l1, ECE and NLL of the answers, clone accuracy per
attack, adversary error gain over QAT of the same backend), ``defender_vs_clone.png``,
``clone_vs_queries.png`` and ``divqat_transition.png`` (accuracy and KL against alpha, per epoch)."""

from __future__ import annotations

import math
import statistics
from functools import partial
from pathlib import Path

from qrobust import plotstyle
from qrobust.defenses.output import defense_accuracy_warning
from qrobust.experiment.engine import compute_seconds
from qrobust.studies.divqat.attacks import ATTACK_LABELS, EXTRACTION_ATTACKS
from qrobust.studies.divqat.config import StudyConfig, victim_names
from qrobust.studies.tables import fmt, mean_of, paired_differences

PAPER_BUDGETS = "KnockoffNets 50k queries, DFME 20M, MAZE 5M (CIFAR-10)"


def error_gains(cfg: StudyConfig, agg: dict) -> dict:
    """Adversary error gain of each DivQAT victim over QAT of the same backend, per defense and attack:
    ``(1 - clone_acc_DivQAT) - (1 - clone_acc_QAT) = clone_acc_QAT - clone_acc_DivQAT`` (seed means)."""
    cells, out = agg["cells"], {}
    base = f"qat-{cfg.divqat.backend}"
    for name in victim_names(cfg):
        if not name.startswith("divqat-"):
            continue
        for defense, per_a in cells.get(name, {}).items():
            for attack, cell in per_a.items():
                ref = cells.get(base, {}).get(defense, {}).get(attack)
                if ref is not None:
                    gain = ref["clone_acc"]["mean"] - cell["clone_acc"]["mean"]
                    out.setdefault(name, {}).setdefault(defense, {})[attack] = gain
    return out


def paired_gain_std(cfg: StudyConfig, agg: dict, name: str, defense: str, attack: str) -> float | None:
    """Std over seeds of the per-seed gain ``clone_acc_QAT(s) - clone_acc_DivQAT(s)`` (seeds paired: the same
    seed's data splits and cell seed; :func:`paired_differences`); None with fewer than two seeds or without
    per-seed values."""
    cells = agg["cells"]
    cell = cells.get(name, {}).get(defense, {}).get(attack)
    ref = cells.get(f"qat-{cfg.divqat.backend}", {}).get(defense, {}).get(attack)
    if not cell or not ref or "clone_acc_per_seed" not in cell or "clone_acc_per_seed" not in ref:
        return None
    ref_values, values = ref["clone_acc_per_seed"], cell["clone_acc_per_seed"]
    if len(ref_values) != len(values):  # both lists follow the study's seeds: a mismatch is a bug upstream
        raise ValueError(f"{name}/{defense}/{attack}: {len(values)} per-seed values, {len(ref_values)} for QAT")
    diff = paired_differences(dict(enumerate(ref_values)), dict(enumerate(values)))
    return diff["std"] if diff and len(diff["values"]) > 1 else None


def defense_warnings(cfg: StudyConfig, defenses: dict) -> list[str]:
    """One line per (victim, defense) whose mean test defender accuracy is below half the undefended
    victim's (:func:`defense_accuracy_warning`), from the seed-aggregated ``defenses`` table."""
    out = []
    for name in victim_names(cfg):
        for defense in cfg.defense.names:
            message = defense_accuracy_warning(f"{defense} on victim {name}",
                                               defenses[name]["none"]["defender_acc"]["mean"],
                                               defenses[name][defense]["defender_acc"]["mean"])
            if message:
                out.append(message)
    return out


def _pct(cell: dict | None, seeds: int, signed: bool = False) -> str:
    """A percentage cell; ``-`` for a cell not run or without a value."""
    if cell is None or math.isnan(mean_of(cell)):
        return "-"
    return fmt(cell, seeds, signed=signed)


def _per_seed(value) -> str:
    """A victim setting as text: ``0.55`` when every seed shares it, ``0.55/0.55/0.5`` (seed order) when
    it was chosen per seed (the operating point)."""
    return "/".join(f"{v:g}" for v in value) if isinstance(value, list) else f"{value:g}"


def _label(name: str, v_info: dict) -> str:
    meta = v_info[name]
    if meta["kind"] == "divqat-op":
        return f"DivQAT op. point (α={_per_seed(meta['alpha'])}, ep {_per_seed(meta['epoch'])}, {meta['backend']})"
    if meta["kind"] == "divqat-hinge-op":
        return (f"DivQAT-hinge op. point, beyond paper (cap {meta['kl_cap']:g}, α={_per_seed(meta['alpha'])}, "
                f"ep {_per_seed(meta['epoch'])}, {meta['backend']})")
    if meta["kind"] == "divqat":
        return f"DivQAT(α={meta['alpha']:g}, {meta['backend']})"
    if meta["kind"] == "qat":
        return f"QAT ({meta['backend']})"
    return "float"


def _short_label(meta: dict) -> str:
    """A victim's short label in the figures: the alpha of a DivQAT victim, else QAT-<backend> or float."""
    if meta["kind"] == "divqat-op":
        return f"op α={_per_seed(meta['alpha'])} ep{_per_seed(meta['epoch'])}"
    if meta["kind"] == "divqat-hinge-op":
        return f"hinge op α={_per_seed(meta['alpha'])} ep{_per_seed(meta['epoch'])}"
    if meta["kind"] == "divqat":
        return f"α={meta['alpha']:g}"
    return f"QAT-{meta['backend']}" if meta["kind"] == "qat" else "float"


def report(cfg: StudyConfig, results: dict, root: Path) -> str:
    """``results.md`` (returned) and the figures (written into ``root``)."""
    plots(cfg, results, root)
    clone_vs_queries_plot(cfg, results, root)
    if results.get("divqat_sweep"):
        transition_plot(cfg, results, root)
    return results_markdown(cfg, results, results["error_gain_over_qat"], len(cfg.seeds), compute_seconds(results),
                            results["splits"], results["transfer_set"])


def mean_error_gains(cfg: StudyConfig, gains: dict) -> dict[str, float]:
    """Mean adversary error gain per attack over every DivQAT victim and defense; reference points (the
    noise floor) are not attacks and are left out."""
    out = {}
    for a in cfg.attack.names:
        if EXTRACTION_ATTACKS[a].reference:
            continue
        values = [g[a] for per_d in gains.values() for g in per_d.values() if a in g]
        if values:
            out[a] = sum(values) / len(values)
    return out


def mean_gain_sentence(cfg: StudyConfig, gains: dict) -> str:
    """The report's sentence on the mean adversary error gain; it says so when no attack gives one (a study
    of the noise floor alone, or without DivQAT victims) instead of ending on an empty list."""
    mean_gain = mean_error_gains(cfg, gains)
    head = ("Mean adversary error gain of DivQAT over QAT (all DivQAT victims and defenses; the noise floor is a "
            "reference, not an attack, and is left out), in points: ")
    if not mean_gain:
        return head + "none: no attack other than a reference ran on a DivQAT victim."
    return head + ", ".join(f"{ATTACK_LABELS[a]} {100 * v:+.1f}" for a, v in mean_gain.items()) + "."


def operating_point_lines(cfg: StudyConfig, agg: dict) -> list[str]:
    """The operating point per seed (validation images) as a markdown table, for the paper's loss and,
    when run, the beyond-paper hinge variant."""
    points = agg.get("divqat_operating_point")
    if not points:
        return []
    rows = [("DivQAT", p) for p in points.items()]
    rows += [("DivQAT-hinge (beyond paper)", p) for p in agg.get("divqat_hinge_operating_point", {}).items()]
    lines = ["## DivQAT's operating point", "",
             f"Per seed, over alphas {sorted(set(cfg.divqat.alphas) | set(cfg.divqat.search_alphas))} and every "
             f"epoch checkpoint (1..{cfg.divqat.epochs}): the largest mean KL(f_q || f_fp) on validation images "
             f"whose validation accuracy is within {cfg.divqat.max_acc_cost:g} points of plain QAT "
             f"(QAT-{cfg.divqat.backend}). It is attacked as the `DivQAT op. point` rows. Figure: "
             "divqat_transition.png.", "",
             "| loss | seed | alpha | epoch | val acc | val acc QAT | KL | KL QAT | within cost |",
             "|---|---|---|---|---|---|---|---|---|"]
    if cfg.divqat.hinge_cap > 0:
        lines[2] += (f" Beyond the paper: DivQAT-hinge rewards each image's KL only up to {cfg.divqat.hinge_cap:g} "
                     "nats (a bounded divergence), searched over the same alphas and epochs and chosen at the "
                     "same accuracy cost; its victim is attacked as the `DivQAT-hinge op. point` rows.")
    for loss, (seed, op) in rows:
        lines.append(f"| {loss} | {seed} | {op['alpha']:g} | {op['epoch']} | {100 * op['acc']:.2f} | {100 * op['acc_qat']:.2f} | "
                     f"{op['kl']:.4f} | {op['kl_qat']:.4f} | {'yes' if op['within_cost'] else '**no**'} |")
    return [*lines, ""]


def results_markdown(cfg: StudyConfig, agg: dict, gains: dict, seeds: int, seconds: float, splits: dict,
                     transfer: str) -> str:
    v_info, defenses, cells = agg["victims"], agg["defenses"], agg["cells"]
    attacks = list(cfg.attack.names)
    lines = [
        f"# DivQAT extraction study: {cfg.name}",
        "",
        f"{cfg.data.name}, {cfg.model.arch} (width {cfg.model.width}) victims at {cfg.qat.bits} bits, seeds "
        f"{cfg.seeds}{' (mean ± std)' if seeds > 1 else ''}; splits per seed: {splits}. Compute time of all "
        f"stages (summed over calls and seeds): {seconds / 60:.1f} min. Accuracies in %.",
        "",
        f"**Budgets**: KnockoffNets {cfg.knockoff.queries} queries (transfer set: {transfer}; "
        f"{cfg.knockoff.epochs} clone epochs), noise floor the same, DFME {cfg.dfme.queries}, MAZE "
        f"{cfg.maze.queries} queries. The papers use {PAPER_BUDGETS}"
        + (": **these budgets are far below the papers'**, so DFME/MAZE clones stay weak and differences "
           "between victims are small and noisy." if cfg.dfme.queries < 1_000_000 else "."),
        "",
        "## Victims: accuracy and the mechanism",
        "",
        "Mean KL(f_q || f_fp) on test images: how far each quantized victim's probabilities are from the "
        "float model's (DivQAT's mechanism; plain QAT should be near 0).",
        "",
        "Tie rate: share of test images whose top-1 logit is tied (decided by argmax's lowest index, not "
        "by the model); the input quantizer and the logits stay 8-bit at every body width.",
        "",
        "| victim | backend | alpha | test acc | tie rate | mean KL(f_q \\|\\| f_fp) |",
        "|---|---|---|---|---|---|",
    ]
    for name, meta in v_info.items():
        kl = meta["kl_to_fp"]
        kl_text = f"{kl['mean']:.4f}" + (f" ± {kl['std']:.4f}" if seeds > 1 else "")
        lines.append(f"| {name} | {meta['backend'] or '-'} | {_per_seed(meta['alpha']) if meta['alpha'] else '-'} | "
                     f"{_pct(meta['test_acc'], seeds)} | {_pct(meta['tie_rate'], seeds)} | {kl_text} |")
    lines += [
        "",
        f"## Extraction: victim x defense (l1 <= {cfg.defense.l1_budget} on validation) x attack",
        "",
        f"Clone accuracy (lower is better for the defender); for DivQAT rows, in brackets: adversary error "
        f"gain over QAT-{cfg.divqat.backend} with the same defense and attack, in points (positive = DivQAT "
        "helps; with several seeds: mean ± std of the per-seed differences, paired by seed). `-` = cell not "
        "run (hard-label KnockoffNets and the noise floor run with "
        f"{cfg.attack.label_defenses} only).",
        "",
        "| victim | defense | defender acc | l1 (test) | ECE | NLL | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(attacks),
    ]
    for name in victim_names(cfg):
        for defense in cfg.defense.names:
            row = cells.get(name, {}).get(defense, {})
            dmeta = defenses[name][defense]
            parts = []
            for a in attacks:
                cell = row.get(a)
                text = _pct(cell["clone_acc"], seeds) if cell else "-"
                gain = gains.get(name, {}).get(defense, {}).get(a)
                if cell and gain is not None:
                    std = paired_gain_std(cfg, agg, name, defense, a)
                    text += f" ({100 * gain:+.1f}" + (f" ± {100 * std:.1f}" if std is not None else "") + ")"
                parts.append(text)
            lines.append(f"| {_label(name, v_info)} | {defense} | {_pct(dmeta['defender_acc'], seeds)} | "
                         f"{dmeta['l1_test']['mean']:.3f} | {_num(dmeta.get('ece'), 100, 1)} | "
                         f"{_num(dmeta.get('nll'), 1, 3)} | " + " | ".join(parts) + " |")
    warned = defense_warnings(cfg, defenses)
    if warned:
        lines += ["", "**Warning**: " + " ".join(f"{w}." for w in warned)]
    ledger_ok = all(c["ledger_matches_queries"] for per_d in cells.values() for per_a in per_d.values()
                    for c in per_a.values())
    lines += ["", "ECE: expected calibration error of the answers served (15 equal-width confidence bins), in "
              "points; NLL: their mean negative log-likelihood of the true label (nats; probabilities floored at "
              "1e-12), both on the test images.", "",
              mean_gain_sentence(cfg, gains), "",
              "Independent query count (rows the victim's model computed = rows its defense saw = its ledger = the "
              f"queries the attack reports) in every cell: {'yes' if ledger_ok else '**NO**'}. Agreement (clone = "
              "victim label), l1 and per-seed histories are in results.json.", "",
              "Figures: defender_vs_clone.png (defender vs clone accuracy per victim), clone_vs_queries.png "
              "(clone accuracy against queries for every attack x defense, mean over seeds; KnockoffNets at a "
              "geometric ladder of budgets, `knockoff.ladder`; DFME/MAZE every `eval_every` iterations).", ""]
    lines += operating_point_lines(cfg, agg)
    return "\n".join(lines)


def _num(cell: dict | None, scale: float, digits: int) -> str:
    if cell is None or math.isnan(mean_of(cell)):
        return "-"
    return f"{scale * cell['mean']:.{digits}f}"


@plotstyle.styled
def plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    """``defender_vs_clone.png``: defender vs clone accuracy per attack (one point per victim and defense:
    colour = victim, marker = defense, both in the legend under the panels, so no text sits on the points);
    and ``clone_vs_queries.png`` (:func:`clone_vs_queries_plot`). Style: :mod:`qrobust.plotstyle`."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    v_info, defenses, cells = agg["victims"], agg["defenses"], agg["cells"]
    attacks = [a for a in cfg.attack.names if not EXTRACTION_ATTACKS[a].reference]
    markers = {"none": "o", "rs": "s", "dcp": "^"}
    names = victim_names(cfg)
    looks = {name: plotstyle.series_style(k) for k, name in enumerate(names)}  # 9+ victims: no look repeats
    n = max(1, len(attacks))
    fig = Figure(figsize=(3.8 * n, 3.6), layout="constrained")
    axes = [fig.add_subplot(1, n, i + 1) for i in range(len(attacks))]
    for i, (ax, attack) in enumerate(zip(axes, attacks, strict=True)):
        for defense in cfg.defense.names:
            for name in names:
                cell = cells.get(name, {}).get(defense, {}).get(attack)
                if cell is not None:
                    look = looks[name]
                    ax.scatter(100 * cell["clone_acc"]["mean"], 100 * defenses[name][defense]["defender_acc"]["mean"],
                               marker=markers.get(defense, "o"), s=36, alpha=0.85, zorder=3, edgecolors=look["color"],
                               facecolors=look["markerfacecolor"])
        ax.set_xlabel("clone accuracy (%)")
        if i == 0:
            ax.set_ylabel("defender accuracy (%)")
        ax.set_title(ATTACK_LABELS[attack])
    handles = [Line2D([], [], linestyle="", marker="o", color=looks[name]["color"],
                      markerfacecolor=looks[name]["markerfacecolor"], label=_short_label(v_info[name]))
               for name in names]
    handles += [Line2D([], [], linestyle="", marker=markers.get(d, "o"), color="gray", label=f"defense: {d}")
                for d in cfg.defense.names]
    plotstyle.legend_below(fig, handles, [h.get_label() for h in handles])
    plotstyle.save_png(fig, root / "defender_vs_clone.png")


def mean_history(histories: list[list]) -> list[tuple[float, float]]:
    """Clone accuracy against queries, averaged over seeds: the budgets every seed evaluated at (``None``
    accuracies and 0 queries left out; a log axis has no 0), in query order."""
    per_seed = [{q: a for q, a in h if a is not None and q > 0} for h in histories]
    common = set(per_seed[0]).intersection(*per_seed[1:]) if per_seed else set()
    return [(q, statistics.fmean(s[q] for s in per_seed)) for q in sorted(common)]


def query_panels(cfg: StudyConfig, cells: dict) -> list[tuple[str, str]]:
    """The (attack, defense) pairs with at least one cell, in the settings' order; reference points (the
    noise floor) are not attacks and get no panel."""
    names = victim_names(cfg)
    return [(a, d) for a in cfg.attack.names if not EXTRACTION_ATTACKS[a].reference for d in cfg.defense.names
            if any(a in cells.get(name, {}).get(d, {}) for name in names)]


@plotstyle.styled
def clone_vs_queries_plot(cfg: StudyConfig, agg: dict, root: Path) -> None:
    """``clone_vs_queries.png``: clone accuracy against queries for every attack x defense that ran (one
    panel each, one line per victim, mean over the seeds at the budgets every seed evaluated at). A panel
    with few budgets (the KnockoffNets ladder) has its ticks at exactly those budgets."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    v_info, cells = agg["victims"], agg["cells"]
    names = victim_names(cfg)
    looks = {name: plotstyle.series_style(k) for k, name in enumerate(names)}  # as in defender_vs_clone.png
    panels = query_panels(cfg, cells)
    if not panels:
        return
    ncols = min(5, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(3.4 * ncols, 3.1 * nrows + 0.6), layout="constrained")
    seeds = len(cfg.seeds)
    fig.suptitle(f"Clone accuracy vs queries ({'mean of ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'})")
    for i, (attack, defense) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        budgets: set[float] = set()
        for name in names:
            cell = cells.get(name, {}).get(defense, {}).get(attack)
            points = mean_history(cell["history"]) if cell else []
            if points:
                budgets.update(q for q, _ in points)
                ax.plot([q for q, _ in points], [100 * a for _, a in points], markersize=4, **looks[name])
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_queries_label))
        if 0 < len(budgets) <= 6:  # a ladder: its budgets are the ticks
            ax.xaxis.set_major_locator(FixedLocator(sorted(budgets)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_minor_formatter(FuncFormatter(partial(_minor_queries_label, ax)))
            ax.tick_params(axis="x", which="minor", pad=5.0)  # minor labels on the major labels' baseline
        if i >= len(panels) - ncols:
            ax.set_xlabel("queries")
        if i % ncols == 0:
            ax.set_ylabel("clone accuracy (%)")
        ax.set_title(f"{ATTACK_LABELS[attack]}\n{'no defense' if defense == 'none' else defense.upper()}")
    handles = [Line2D([], [], markersize=4, label=_short_label(v_info[name]), **looks[name]) for name in names]
    plotstyle.legend_below(fig, handles, [h.get_label() for h in handles])  # one entry per victim
    plotstyle.save_png(fig, root / "clone_vs_queries.png")


def _leading_digit(value: float) -> int:
    return int(f"{value:.0e}"[0]) if value > 0 else 0


def _minor_queries_label(ax, value: float, _position=None) -> str:
    """Minor tick labels at 2 and 5 x 10^k, only while the axis spans under 3 decades (wider, they run
    together)."""
    low, high = ax.get_xlim()
    if low <= 0 or high / low >= 1e3 or _leading_digit(value) not in (2, 5):
        return ""
    return _queries_label(value)


def _queries_label(value: float, _position=None) -> str:
    """A compact query count for a log axis: 500, 2k, 50k, 1M."""
    for unit, suffix in ((1e6, "M"), (1e3, "k")):
        if value >= unit:
            return f"{value / unit:g}{suffix}"
    return f"{value:g}"


@plotstyle.styled
def transition_plot(cfg: StudyConfig, agg: dict, root: Path) -> None:
    """``divqat_transition.png``: validation accuracy and mean KL(f_q || f_fp) against alpha (log x), one
    line per epoch checkpoint (dashed: the beyond-paper hinge variant, when run), the first seed; QAT's values and the accuracy floor of the operating point
    as dashed lines, the operating point circled; one legend under both panels (style: :mod:`qrobust.plotstyle`)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    seed = next(iter(agg["divqat_sweep"]))
    sweep, op = agg["divqat_sweep"][seed], agg["divqat_operating_point"][seed]
    hinge = agg.get("divqat_hinge_sweep", {}).get(seed, [])  # the beyond-paper variant, dashed
    fig = Figure(figsize=(9, 4.0), layout="constrained")
    for j, (key, label, scale) in enumerate((("acc", "validation accuracy (%)", 100), ("kl", "mean KL(f_q || f_fp)", 1))):
        ax = fig.add_subplot(1, 2, j + 1)
        for name, rows_all, style in (("", sweep, "-"), ("hinge ", hinge, "--")):
            for epoch in sorted({r["epoch"] for r in rows_all}):
                rows = sorted((r for r in rows_all if r["epoch"] == epoch), key=lambda r: r["alpha"])
                ax.plot([r["alpha"] for r in rows], [scale * r[key] for r in rows], marker="o", ms=3, ls=style,
                        label=f"{name}epoch {epoch}")
        ax.axhline(scale * op[f"{key}_qat"], color="gray", ls="--", lw=1, label="plain QAT")
        if key == "acc":
            ax.axhline(100 * op["acc_qat"] - cfg.divqat.max_acc_cost, color="red", ls=":", lw=1,
                       label=f"QAT - {cfg.divqat.max_acc_cost:g} pts")
        ax.scatter([op["alpha"]], [scale * op[key]], s=120, facecolors="none", edgecolors="black",
                   label="operating point")
        ax.set_xscale("log")
        alphas = sorted({r["alpha"] for r in sweep})
        ax.set_xticks(alphas, [f"{a:g}" for a in alphas], rotation=45, ha="right", rotation_mode="anchor")  # the trained alphas only
        ax.xaxis.set_minor_formatter(NullFormatter())
        if key == "kl":
            ax.set_yscale("log")  # matplotlib's minor labels: shown only when the axis spans under a decade
        ax.set_xlabel("alpha")
        ax.set_ylabel(label)
    fig.suptitle(f"DivQAT transition ({cfg.data.name}, seed {seed}, validation images)", fontweight="bold")
    plotstyle.legend_below(fig, *plotstyle.legend_entries(fig.axes))
    plotstyle.save_png(fig, root / "divqat_transition.png")
