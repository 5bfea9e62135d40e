"""The SQ study's report: Markdown tables (results.md), a reading generated from the numbers, and the
figures robust_accuracy.png and aip.png."""

from __future__ import annotations

import math
from pathlib import Path

from qrobust import plotstyle
from qrobust.experiment.engine import compute_seconds
from qrobust.studies.sq.attacks import ABLATION_ATTACKS, ATTACK_LABELS, ATTACKS, STRENGTH_CHECKS
from qrobust.studies.sq.config import INPUT_ROUNDED, ROUNDED, StudyConfig, model_names
from qrobust.studies.tables import fmt, mean_of


def write_report(cfg: StudyConfig, results: dict, root: Path) -> str:
    """results.md's text; writes the figures into ``root``."""
    agg = {k: results[k] for k in ("models", "evaluation", "adaptive", "ablation") if k in results}
    plots(cfg, agg, root)
    return results_markdown(cfg, agg, len(cfg.seeds), compute_seconds(results))


def model_label(cfg: StudyConfig, name: str) -> str:
    n = cfg.sq.n_draws
    return {
        "fp32": "float",
        "fp32-ft": f"float + {cfg.sq.epochs} epochs (matched control)",
        INPUT_ROUNDED: f"float + {cfg.sq.epochs} epochs, input rounded to {cfg.sq.num_bins} fixed levels (control)",
        f"qat{cfg.qat_bits}": f"QAT {cfg.qat_bits}-bit (deterministic)",
        "sq": f"SQ, no MI (beta=0, N={n})",
        "sq-mi": f"SQ + MI (beta={cfg.sq.beta:g}, MI on {cfg.sq.mi_on}, N={n})",
        ROUNDED: "SQ + MI, SQs rounding to the nearest bin (deterministic control)",
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
        f"no gradient masking). APGD-CE on a randomised model counts a point as fooling only if "
        f"{a.draws} evaluations all misclassify it.",
        "",
        f"**Counting rule (every model alike)**: each model is evaluated {a.draws} times (for an SQ model each "
        f"evaluation is one N-draw ensemble, the deployed model; a deterministic model gives the same answer "
        f"each time); an image is robust in an evaluation when it is classified correctly clean *and* "
        f"attacked in that evaluation. **expected** = mean over the evaluations and images; **strict** = share "
        f"of images robust in all {a.draws} evaluations. **worst case** = per image over every attack: robust "
        f"only if it survives all of them (in the same evaluation), the number to quote.",
        "",
        "## Robust accuracy (%) vs eps: strict / expected",
        "",
        "| model | clean strict / expected | clean (one ensemble) | tie rate | attack | "
        + " | ".join(f"eps={e}" for e in a.eps)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(a.eps),
    ]
    for name in model_names(cfg):
        e = ev[name]
        strict, expected = e["accuracy_strict"], e["accuracy_expected"]
        for attack in ATTACKS:
            lines.append(
                f"| {model_label(cfg, name)} | {fmt(strict['clean'], seeds)} / {fmt(expected['clean'], seeds)} | "
                f"{fmt(e['clean_acc'], seeds)} | "
                f"{fmt(e['tie_rate'], seeds) if 'tie_rate' in e else '-'} | {ATTACK_LABELS[attack]} | "
                + " | ".join(f"{fmt(strict['attacks'][attack][spec], seeds)} / "
                             f"{fmt(expected['attacks'][attack][spec], seeds)}" for spec in a.eps)
                + " |"
            )
        lines.append(f"| {model_label(cfg, name)} | | | | **worst case (per image)** | "
                     + " | ".join(f"**{fmt(strict['worst'][spec], seeds)}** / **{fmt(expected['worst'][spec], seeds)}**"
                                  for spec in a.eps) + " |")
    masking = []
    for name in model_names(cfg):
        e = ev[name]["robust"]
        for check_attack in STRENGTH_CHECKS:
            gaps = [mean_of(e["pgd"][spec]) - mean_of(e[check_attack][spec]) for spec in a.eps]
            gap = max((g for g in gaps if not math.isnan(g)), default=float("nan"))
            if gap > 0.02:
                masking.append(f"{model_label(cfg, name)}: {ATTACK_LABELS[check_attack]} by up to {100 * gap:.1f} points")
    check = ("**Attack-strength check**: a stronger or gradient-free attack beats fixed-step PGD on "
             + "; ".join(masking) + ". PGD's numbers there are inflated (by misleading quantizer gradients if "
             "BPDA or Square wins, by PGD's fixed step size if APGD-CE wins); quote the worst case."
             if masking else "**Attack-strength check**: neither APGD-CE, BPDA nor the black-box Square Attack "
             "beats PGD by more than 2 points on any model: no sign that PGD's gradients are masked by the "
             "quantizers.")
    if "fp32-ft" in ev:
        lines_ft = ev["fp32-ft"]["accuracy_strict"]
        check += (" The matched float control (fine-tuned for the SQ models' extra epochs) has worst case "
                  + ", ".join(f"{fmt(lines_ft['worst'][spec], 1)}%" for spec in a.eps) + f" (eps {', '.join(a.eps)}).")
    fp = ev["fp32"]["robust"]
    square_strength = [(mean_of(fp["square"][spec]), mean_of(fp["pgd"][spec])) for spec in a.eps]
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
        f"MI {a.detector_direction} the threshold (MI = the class-output reading, between the draws). "
        "**AUROC pooled**: all clean test images vs all attacked ones (failed attacks and images wrong when "
        "clean included: pulls it toward 0.5); **AUROC successful**: clean-correct images vs the attacked "
        "versions of clean-correct images that fool the ensemble (n/a when none does). Detection rate = share "
        "of attacked images flagged; ensemble accuracy on the attacked images.",
        "",
    ]
    for name in ("sq", "sq-mi"):
        d = ev[name]["detector"]
        lines += [
            f"**{model_label(cfg, name)}**: clean MI {fmt(d['clean_mi'], seeds, False)} nats, "
            f"FPR val {fmt(d['fpr_val'], seeds)}%, FPR test {fmt(d['fpr_test'], seeds)}%",
            "",
            "| attack | eps | ensemble acc | mean MI | AUROC pooled | AUROC successful | detection rate |",
            "|---|---|---|---|---|---|---|",
        ]
        for attack in ATTACKS:
            for spec in a.eps:
                lines.append(
                    f"| {ATTACK_LABELS[attack]} | {spec} | {fmt(ev[name]['adv_acc'][attack][spec], seeds)} | "
                    f"{fmt(d['adv_mi'][attack][spec], seeds, False)} | "
                    f"{fmt(d['auroc'][attack][spec], seeds, False)} | "
                    f"{fmt(d['auroc_successful'][attack][spec], seeds, False)} | "
                    f"{fmt(d['detection_rate'][attack][spec], seeds)} |"
                )
        lines.append("")
    lines.append("Figure: aip.png (mean MI vs ensemble accuracy, points in eps order).")
    lines += [
        "",
        "## Diversity of the draws and the bin spacing (clean test images)",
        "",
        "T = the quantized values at the last SQ (before the classifier), X = the image, per value (nats; "
        "max log K): H(T|X) = the draws' diversity on one image, H(T) = the batch marginal's entropy, "
        "I = H(T) - H(T|X). Output MI = the class-output reading between the draws; disagreement = share of "
        "draws whose top-1 differs from the ensemble's. Gaps = learned bin gaps / the uniform gap of the "
        "calibrated range, per SQ (the spacing term's quantity: > 1 amplifies the quantization noise); shift = the "
        "grid's learned offset / the range (the term's second part; < 0 = bins moved down); first boundary = how far "
        "above the range's low end values start to round to the second bin (input SQ: pixel units, the eps a "
        "black pixel needs).",
        "",
        "| model | H(T\\|X) | H(T) | I(X;T) | output MI | disagreement | gaps / uniform gap (shift / range) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in model_names(cfg):
        if "diversity" not in ev[name]:
            continue
        dv = ev[name]["diversity"]
        lines.append(f"| {model_label(cfg, name)} | {fmt(dv['h_t_given_x'], seeds, False)} | "
                     f"{fmt(dv['h_t'], seeds, False)} | {fmt(dv['mi'], seeds, False)} | "
                     f"{fmt(dv['output_mi'], seeds, False, '.4f')} | {fmt(dv['disagreement'], seeds)}% | "
                     f"{_gaps(ev[name])} |")
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
            "| attack | robust acc strict / expected | ensemble acc | mean MI | AUROC pooled | AUROC successful "
            "| detection rate | undetected success |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for label in ("eot-pgd", "adaptive"):
            r = ad[label]
            lines.append(
                f"| {label} | {fmt(r['robust_acc'], seeds)} / {fmt(r.get('accuracy_expected'), seeds)} | "
                f"{fmt(r['adv_acc'], seeds)} | "
                f"{fmt(r['mean_mi'], seeds, False)} | {fmt(r['auroc'], seeds, False)} | "
                f"{fmt(r.get('auroc_successful'), seeds, False)} | "
                f"{fmt(r['detection_rate'], seeds)} | {fmt(r['undetected_success'], seeds)} |"
            )
    else:
        lines += ["", "Adaptive attack on the detector: not run (attack.adaptive = false)."]
    if "ablation" in agg:
        ab = agg["ablation"]
        lines += [
            "",
            f"## Ablations (SQ + MI, one setting changed; eps={ab['eps']})",
            "",
            "Robust accuracy strict per attack; worst case per image, strict / expected. Diversity and gaps as "
            "in the table above (T at the last SQ); `spacing<w>` rows change the spacing term's weight.",
            "",
            "| variant | clean acc (ensemble) | H(T\\|X) | H(T) | disagreement | output MI | gaps / uniform gap (shift / range) "
            "| PGD | EOT-PGD | APGD-CE | BPDA | Square | worst case |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in ab["rows"].items():
            cells = " | ".join(fmt(r[k], seeds) if k in r else "n/a"
                               for k in ABLATION_ATTACKS)
            dv = r["diversity"]
            lines.append(f"| {name} | {fmt(r['clean_acc'], seeds)} | {fmt(dv['h_t_given_x'], seeds, False)} | "
                         f"{fmt(dv['h_t'], seeds, False)} | {fmt(dv['disagreement'], seeds)}% | "
                         f"{fmt(dv['output_mi'], seeds, False, '.4f')} | {_gaps(r)} | {cells} | "
                         f"**{fmt(r['accuracy_strict']['worst'], seeds)}** / {fmt(r['accuracy_expected']['worst'], seeds)} |")
    lines += ["", "## Reading", "", _reading(cfg, agg), ""]
    return "\n".join(lines)


def _gaps(record: dict) -> str:
    """Per SQ: the learned bin gaps / the uniform gap, then its grid shift / range and first boundary, seed
    means ("n/a" for a record written before ablation rows recorded gaps; the others left out where a record
    predates them)."""
    gaps, shifts, bounds = record.get("sq_gaps"), record.get("sq_shift", {}), record.get("sq_first_boundary", {})
    if not gaps:
        return "n/a"

    def extra(sq: str) -> str:
        parts = ([f"shift {mean_of(shifts[sq]):+.2f}"] if sq in shifts else []) + (
            [f"first boundary {mean_of(bounds[sq]):.3f}"] if sq in bounds else [])
        return f" ({', '.join(parts)})" if parts else ""

    return "; ".join(f"{sq}: " + ", ".join(f"{mean_of(g):.2f}" for g in gs) + extra(sq) for sq, gs in gaps.items())


def _worst(record: dict, spec: str, count: str = "accuracy_strict") -> float:
    """The per-image worst case over every attack (robust only if it survives all) at ``spec``."""
    return mean_of(record[count]["worst"][spec])


def _reading(cfg: StudyConfig, agg: dict) -> str:
    """One honest paragraph generated from the numbers: what survives EOT and the strongest attack."""
    ev, a = agg["evaluation"], cfg.attack
    spec = a.eps[len(a.eps) // 2]
    pgd_, eot = mean_of(ev["sq-mi"]["robust"]["pgd"][spec]), mean_of(ev["sq-mi"]["robust"]["eot-pgd"][spec])
    qat = f"qat{cfg.qat_bits}"
    fp_, q = mean_of(ev["fp32"]["robust"]["pgd"][spec]), mean_of(ev[qat]["robust"]["pgd"][spec])
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
        f"Over all attacks (per image, strict) the worst case is {100 * _worst(ev['fp32'], spec):.1f}% (float), "
        f"{100 * _worst(ev['fp32-ft'], spec):.1f}% (float, matched fine-tuning), "
        f"{100 * _worst(ev[qat], spec):.1f}% (QAT) and {100 * _worst(ev['sq-mi'], spec):.1f}% (SQ+MI); expected: "
        f"{100 * _worst(ev['fp32'], spec, 'accuracy_expected'):.1f}%, "
        f"{100 * _worst(ev['fp32-ft'], spec, 'accuracy_expected'):.1f}%, "
        f"{100 * _worst(ev[qat], spec, 'accuracy_expected'):.1f}% and "
        f"{100 * _worst(ev['sq-mi'], spec, 'accuracy_expected'):.1f}%: those are the numbers to compare. "
    )
    if ROUNDED in ev:
        diff = _worst(ev[ROUNDED], spec) - _worst(ev["sq-mi"], spec)
        text += (
            f"The same SQ+MI network with its SQs rounding to the nearest bin (one deterministic forward) keeps "
            f"{100 * _worst(ev[ROUNDED], spec):.1f}%: the sampling noise {'costs' if diff > 0 else 'adds'} "
            f"{100 * abs(diff):.1f} points (strict). "
        )
        bound = ev["sq-mi"].get("sq_first_boundary", {}).get("sq_input")
        if bound is not None:
            text += (
                f"Its input SQ rounds a black pixel up only past {mean_of(bound):.3f}: a rounding input "
                f"quantizer protects background pixels against any eps below that and none above it "
                f"(worst case of the rounded network: "
                + ", ".join(f"{100 * _worst(ev[ROUNDED], e):.1f}% at {e}" for e in a.eps) + "). "
            )
    if INPUT_ROUNDED in ev:
        first = 0.5 / (cfg.sq.num_bins - 1)
        text += (
            f"The float network fine-tuned the same way behind a fixed rounding of its pixels to "
            f"{cfg.sq.num_bins} uniform levels (no SQ training, no noise; a black pixel moves only past "
            f"{first:.3f}) keeps " + ", ".join(f"{100 * _worst(ev[INPUT_ROUNDED], e):.1f}% at {e}" for e in a.eps)
            + " (worst case, strict): what input quantization alone buys. "
        )
    return text + ("The paper's claim (> 50% under PGD(5/255) on CIFAR-10 without adversarial training) should "
                   "be judged against the worst case, on the `paper` preset.")


# offset (points), horizontal and vertical alignment of a series' point labels in aip.png: above right, above
# left, right, left
_LABEL_SIDES = (((4, 3), "left", "bottom"), ((-4, 3), "right", "bottom"), ((7, 0), "left", "center"),
                ((-7, 0), "right", "center"))


@plotstyle.styled
def plots(cfg: StudyConfig, agg: dict, root: Path) -> None:
    """``robust_accuracy.png`` (one panel per attack, the worst case first) and ``aip.png``; style:
    :mod:`qrobust.plotstyle`, one legend under the panels."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    a, ev = cfg.attack, agg["evaluation"]
    eps = cfg.eps_values()
    panels = ["worst"] + list(ATTACKS)  # the worst case first: the number to quote
    cols = 4
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4 * cols, 3.3 * rows + 0.5), layout="constrained")
    for i, attack in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name in model_names(cfg):
            e = ev[name]
            curve = [_worst(e, s) if attack == "worst" else mean_of(e["robust"][attack][s]) for s in a.eps]
            ax.plot(
                [0.0] + eps,
                [100 * mean_of(e["clean_acc_all_draws"])] + [100 * v for v in curve],
                "-o",
                markersize=4,
                label=model_label(cfg, name),
            )
        ax.set_title("worst case per image over all attacks" if attack == "worst" else ATTACK_LABELS[attack],
                     fontweight="bold" if attack == "worst" else "normal")
        ax.set_xlabel(f"eps ({a.norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # at most 5 tick labels: they do not run together
    plotstyle.legend_below(fig, *plotstyle.legend_entries(fig.axes))
    plotstyle.save_png(fig, root / "robust_accuracy.png")

    fig = Figure(figsize=(10, 4.4), layout="constrained")
    for i, name in enumerate(("sq", "sq-mi")):
        ax = fig.add_subplot(1, 2, i + 1)
        for k, (attack, rows) in enumerate(ev[name]["aip"].items()):
            (line,) = ax.plot(
                [mean_of(r["mean_mi"]) for r in rows],
                [mean_of(r["accuracy"]) for r in rows],
                "-o",
                markersize=5,
                label=ATTACK_LABELS[attack],
            )
            # eps labels in the series' colour, each series on another side of its points: the attacks share
            # the eps grid, and their points often coincide
            (dx, dy), ha, va = _LABEL_SIDES[k % len(_LABEL_SIDES)]
            for r in rows:
                ax.annotate(
                    f"{mean_of(r['eps']):.3g}",
                    (mean_of(r["mean_mi"]), mean_of(r["accuracy"])),
                    fontsize=8,
                    color=line.get_color(),
                    textcoords="offset points",
                    xytext=(dx, dy),
                    ha=ha,
                    va=va,
                )
        ax.set_title(f"AIP: {model_label(cfg, name)}")
        ax.set_xlabel("mean MI between draws [nats]")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # legible ticks: at most 5, no overlap
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3))
        ax.set_ylabel("ensemble accuracy")
        ax.set_ylim(-0.02, 1.02)
    plotstyle.legend_below(fig, *plotstyle.legend_entries(fig.axes))
    plotstyle.save_png(fig, root / "aip.png")
