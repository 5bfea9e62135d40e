"""The DivQAT study's report: ``results.md`` (the paper-style table: rows QAT / DivQAT(alpha) x defense;
defender accuracy, clone accuracy per attack, adversary error gain over QAT of the same backend),
``defender_vs_clone.png`` and ``clone_vs_queries.png``."""

from __future__ import annotations

import math
from pathlib import Path

from qrobust.defenses.output import defense_accuracy_warning
from qrobust.studies.divqat.attacks import ATTACK_LABELS
from qrobust.studies.divqat.config import StudyConfig, victim_names
from qrobust.studies.tables import fmt, mean_of

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


def _label(name: str, v_info: dict) -> str:
    meta = v_info[name]
    if meta["kind"] == "divqat":
        return f"DivQAT(α={meta['alpha']:g}, {meta['backend']})"
    if meta["kind"] == "qat":
        return f"QAT ({meta['backend']})"
    return "float"


def _short_label(meta: dict) -> str:
    """A point's label in the scatter plot: the alpha of a DivQAT victim, else QAT-<backend> or float."""
    if meta["kind"] == "divqat":
        return f"α={meta['alpha']:g}"
    return f"QAT-{meta['backend']}" if meta["kind"] == "qat" else "float"


def compute_seconds(results: dict) -> float:
    """Seconds of all work (every seed's ``prepare`` and cells, summed over calls)."""
    return sum(v for per_seed in results.get("seconds", {}).values() for k, v in per_seed.items()
               if k == "prepare" or k.startswith("cell "))


def report(cfg: StudyConfig, results: dict, root: Path) -> str:
    """``results.md`` (returned) and the two figures (written into ``root``)."""
    plots(cfg, results, root)
    return results_markdown(cfg, results, results["error_gain_over_qat"], len(cfg.seeds), compute_seconds(results),
                            results["splits"], results["transfer_set"])


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
        lines.append(f"| {name} | {meta['backend'] or '-'} | {meta['alpha'] or '-'} | "
                     f"{_pct(meta['test_acc'], seeds)} | {_pct(meta['tie_rate'], seeds)} | {kl_text} |")
    lines += [
        "",
        f"## Extraction: victim x defense (l1 <= {cfg.defense.l1_budget} on validation) x attack",
        "",
        f"Clone accuracy (lower is better for the defender); for DivQAT rows, in brackets: adversary error "
        f"gain over QAT-{cfg.divqat.backend} with the same defense and attack, in points (positive = DivQAT "
        "helps). `-` = cell not run (hard-label KnockoffNets and the noise floor run with "
        f"{cfg.attack.label_defenses} only).",
        "",
        "| victim | defense | defender acc | l1 (test) | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
        "|---|---|---|---|" + "---|" * len(attacks),
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
                    text += f" ({100 * gain:+.1f})"
                parts.append(text)
            lines.append(f"| {_label(name, v_info)} | {defense} | {_pct(dmeta['defender_acc'], seeds)} | "
                         f"{dmeta['l1_test']['mean']:.3f} | " + " | ".join(parts) + " |")
    warned = defense_warnings(cfg, defenses)
    if warned:
        lines += ["", "**Warning**: " + " ".join(f"{w}." for w in warned)]
    ledger_ok = all(c["ledger_matches_queries"] for per_d in cells.values() for per_a in per_d.values()
                    for c in per_a.values())
    mean_gain = {a: [g[a] for per_d in gains.values() for g in per_d.values() if a in g] for a in attacks}
    lines += ["", "Mean adversary error gain of DivQAT over QAT (all alphas and defenses), in points: "
              + ", ".join(f"{ATTACK_LABELS[a]} {100 * sum(v) / len(v):+.1f}" for a, v in mean_gain.items() if v)
              + ".", "",
              f"Query ledger equals the queries each attack reports in every cell: {'yes' if ledger_ok else 'NO'}. "
              "Agreement (clone = victim label), l1 and per-seed histories are in results.json.", "",
              "Figures: defender_vs_clone.png (defender vs clone accuracy per victim), clone_vs_queries.png.", ""]
    return "\n".join(lines)


def plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    """Defender vs clone accuracy per attack (one point per victim and defense); clone accuracy vs
    queries per attack (undefended victims, the first seed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    v_info, defenses, cells = agg["victims"], agg["defenses"], agg["cells"]
    attacks = [a for a in cfg.attack.names if a != "noise"]
    markers = {"none": "o", "rs": "s", "dcp": "^"}
    fig = Figure(figsize=(3.6 * max(1, len(attacks)), 3.4))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        for defense in cfg.defense.names:
            xs, ys, labels = [], [], []
            for name in victim_names(cfg):
                cell = cells.get(name, {}).get(defense, {}).get(attack)
                if cell is None:
                    continue
                xs.append(100 * cell["clone_acc"]["mean"])
                ys.append(100 * defenses[name][defense]["defender_acc"]["mean"])
                labels.append(_short_label(v_info[name]))
            if xs:
                ax.scatter(xs, ys, marker=markers.get(defense, "o"), label=defense)
                for x, y, text in zip(xs, ys, labels, strict=True):
                    ax.annotate(text, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xlabel("clone accuracy (%)")
        ax.set_ylabel("defender accuracy (%)")
        ax.set_title(ATTACK_LABELS[attack], fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "defender_vs_clone.png"))

    fig = Figure(figsize=(3.6 * max(1, len(attacks)), 3.4))
    for i, attack in enumerate(attacks):
        ax = fig.add_subplot(1, max(1, len(attacks)), i + 1)
        for name in victim_names(cfg):
            cell = cells.get(name, {}).get("none", {}).get(attack)
            if cell is None:
                continue
            points = [(q, a) for q, a in cell["history"][0] if a is not None]
            if points:
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=_label(name, v_info))
        ax.set_xlabel("queries")
        ax.set_ylabel("clone accuracy (%)")
        ax.set_title(f"{ATTACK_LABELS[attack]} (no defense, seed {cfg.seeds[0]})", fontsize=9)
        ax.legend(fontsize=5)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(str(root / "clone_vs_queries.png"))
