"""The card as ``card.md``, ``card.html`` (one self-contained file: figures inlined as base64 PNG, inline CSS,
no external requests) and PNG figures in :mod:`qrobust.plotstyle`. One column per model."""

from __future__ import annotations

import base64
import html
import math

from qrobust import plotstyle

SECTION_TITLES = {
    "deployment": "Deployment",
    "extraction": "Extraction (KnockoffNets, with and without DCP)",
    "patches": "Adversarial patches",
    "whitebox": "White-box L-inf and gradient-masking checks",
}
SECTION_INTROS = {
    "deployment": "Accuracy and tie rate of the model as given; its int8 model where one exists (top-1 agreement "
                  "with the fake-quant twin); size and speed of the float weights, the twin and the int8 model.",
    "extraction": "An attacker queries the model with natural images and trains a clone on the answers. The "
                  "defender may add DCP (confidence-gated reverse sigmoid) to every answer, at the strongest "
                  "setting whose mean l1 distortion stays within the budget; its cost is the defender's accuracy.",
    "patches": "A universal square patch pasted at random places. ASR counts correctly classified images it flips. "
               "Random = an unoptimised noise patch (the floor); transfer = made on the float model; adaptive = "
               "made on this model.",
    "whitebox": "Robust accuracy under APGD-CE, checked by a black-box attack (Square) and BPDA. If either beats "
                "APGD-CE by more than the margin, gradients are masked and the worst case is the number to trust.",
}


# ------------------------------------------------------------------------------------------- values
def fmt(r: dict | None) -> str:
    """A row's value as text (n/a with its reason is handled by the caller; no row: n/a, e.g. the int8
    agreement of a float model next to a QAT one)."""
    if r is None:
        return "n/a"
    v, unit = r.get("value"), r.get("unit")
    if r.get("na") or v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if unit == "share":
        text = f"{100 * v:.1f}%"
        strict = r.get("strict")
        return text + (f" (strict {100 * strict:.1f}%)" if strict is not None and abs(strict - v) > 1e-9 else "")
    if unit == "points":
        return f"{100 * v:.1f} pts"
    if unit == "bytes":
        return f"{v / 1e6:.2f} MB" if v >= 1e6 else f"{v / 1e3:.1f} KB"
    if unit == "ms":
        return f"{v:.2f} ms"
    if unit == "images/s":
        return f"{v:,.0f} img/s"
    if unit == "number":
        return f"{v:.3g}"
    return str(v)


def table(models: list[dict], section: str) -> list[tuple[str, list[dict | None], str]]:
    """(label, the row of each model, details) per row key, in the first model's order."""
    keys: list[str] = []
    for m in models:
        keys += [r["key"] for r in m[section]["rows"] if r["key"] not in keys]
    out = []
    for key in keys:
        rows = [next((r for r in m[section]["rows"] if r["key"] == key), None) for m in models]
        first = next((r for r in rows if r is not None and not r.get("na")), None)  # an n/a row says less
        first = first or next(r for r in rows if r is not None)
        details = "; ".join(p for p in (first.get("attack"), first.get("budget"), first.get("rule")) if p)
        out.append((first["label"], rows, details))
    return out


# ------------------------------------------------------------------------------------------- figures
def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def fig_whitebox(models: list[dict]) -> bytes:
    labels = ["clean"] + list(models[0]["whitebox"]["curves"])
    fig, axes = plotstyle.figure(1, len(models), width=4.6 * len(models) + 0.4, height=3.6, sharey=True)
    attacks = [("apgd", "APGD-CE"), ("square", "Square (black-box)"), ("bpda", "BPDA"), ("worst", "worst case")]
    for ax, m in zip(axes[0], models, strict=True):
        w = m["whitebox"]
        for k, (key, name) in enumerate(attacks):
            ys = [w["clean"]["strict"]] + [w["curves"][lab].get(key, {}).get("strict", math.nan) for lab in labels[1:]]
            if all(math.isnan(v) for v in ys[1:]):
                continue
            dodge = (k - 1.5) * 0.035  # equal curves (e.g. BPDA = APGD-CE) stay visible side by side
            xs = [0.0] + [i + dodge for i in range(1, len(labels))]
            ax.plot(xs, ys, marker=plotstyle.MARKERS[k], color=plotstyle.PALETTE[k], label=name,
                    linestyle="--" if key == "worst" else "-", zorder=3 if key == "worst" else 2)
            if key == "worst":
                for x, v in zip(xs[1:], ys[1:], strict=True):
                    ax.annotate(f"{v:.0%}", (x, v), xytext=(0, -13), textcoords="offset points", ha="center",
                                fontsize=8, color=plotstyle.PALETTE[k])
        ax.set_xticks(range(len(labels)), ["clean"] + [f"eps {lab}" for lab in labels[1:]])
        ax.set_xlim(-0.25, len(labels) - 0.75)
        ax.set_title(_short(m["name"]))
        plotstyle.percent_axis(ax)
    axes[0][0].set_ylabel("robust accuracy (strict)")
    plotstyle.legend_below(fig, *plotstyle.legend_entries(axes[0], [name for _, name in attacks]))
    return plotstyle.png_bytes(fig)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, list[float]]], fmt_: str) -> None:
    import numpy as np

    n = len(series)
    width = 0.8 / n
    xs = np.arange(len(groups))
    for k, (name, values) in enumerate(series):
        heights = [0.0 if math.isnan(v) else v for v in values]
        bars = ax.bar(xs + (k - (n - 1) / 2) * width, heights, width * 0.92, label=name, color=plotstyle.PALETTE[k])
        plotstyle.label_bars(ax, bars, fmt_, values=values)
    ax.set_xticks(xs, plotstyle.wrap_labels(groups, 22))


def _value(m: dict, section: str, key: str) -> float:
    r = next((r for r in m[section]["rows"] if r["key"] == key), None)
    return math.nan if r is None or r.get("value") is None else float(r["value"])


def fig_patches(models: list[dict]) -> bytes:
    sizes = [r["budget"].split(" ")[0] for r in models[0]["patches"]["rows"] if r["key"].startswith("asr_random_")]
    fig, axes = plotstyle.figure(1, len(models), width=4.6 * len(models) + 0.4, height=3.4, sharey=True)
    for ax, m in zip(axes[0], models, strict=True):
        series = [(kind, [_value(m, "patches", f"asr_{kind}_{i}") for i in range(len(sizes))])
                  for kind in ("random", "transfer", "adaptive")]
        _grouped_bars(ax, [f"{s} patch" for s in sizes], series, "{:.0%}")
        ax.set_title(_short(m["name"]))
        plotstyle.percent_axis(ax)
    axes[0][0].set_ylabel("attack success rate")
    plotstyle.legend_below(fig, *plotstyle.legend_entries(axes[0]))
    return plotstyle.png_bytes(fig)


def fig_extraction(models: list[dict]) -> bytes:
    fig, axes = plotstyle.figure(1, 1, width=4.2 + 2.4 * len(models), height=3.4)
    ax = axes[0][0]
    keys = [("defender, no defense", "victim_acc"), ("clone, no defense", "clone_acc_none"),
            ("defender with DCP", "defender_acc_dcp"), ("clone with DCP", "clone_acc_dcp")]
    series = [(name, [_value(m, "extraction", key) for m in models]) for name, key in keys]
    _grouped_bars(ax, [m["name"] for m in models], series, "{:.0%}")
    ax.set_ylabel("test accuracy")
    plotstyle.percent_axis(ax)
    plotstyle.legend_below(fig, *ax.get_legend_handles_labels())
    return plotstyle.png_bytes(fig)


def fig_deployment(models: list[dict]) -> bytes:
    fig, axes = plotstyle.figure(1, 3, width=11.0, height=3.4)
    names = [m["name"] for m in models]
    panels = (("size", "size (KB)", 1e-3, "{:.0f}"), ("latency", "latency (ms, batch 1)", 1.0, "{:.2f}"),
              ("throughput", "throughput (images/s, batch 256)", 1.0, "{:,.0f}"))
    for ax, (what, ylabel, scale, fmt_) in zip(axes[0], panels, strict=True):
        series = [(v, [_value(m, "deployment", f"{what}_{v}") * scale for m in models]) for v in ("fp32", "twin", "int8")]
        _grouped_bars(ax, names, series, fmt_)
        ax.set_ylabel(ylabel)
        top = max((v for _, vs in series for v in vs if not math.isnan(v)), default=1.0)
        ax.set_ylim(0, top * 1.2)
    plotstyle.legend_below(fig, *axes[0][0].get_legend_handles_labels())
    return plotstyle.png_bytes(fig)


def fig_examples(models: list[dict]) -> bytes:
    import numpy as np

    cols = []
    for m in models:
        c = [("clean", m["whitebox"]["clean_example"])]
        c += [(f"adaptive patch {k}", v) for k, v in m["patches"]["examples"].items()]
        c += [(f"APGD-CE eps {k}", v) for k, v in m["whitebox"]["examples"].items()]
        cols.append(c)
    n = max(len(c) for c in cols)
    fig, axes = plotstyle.figure(len(models), n, width=1.6 * n + 0.8, height=1.9 * len(models))
    for i, (m, c) in enumerate(zip(models, cols, strict=True)):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j >= len(c):
                continue
            img = np.asarray(c[j][1], dtype=float)
            img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(c[j][0], fontsize=8, fontweight="normal")
        axes[i][0].text(-0.1, 0.5, _short(m["name"], 18), transform=axes[i][0].transAxes, rotation=90,
                        ha="right", va="center", fontsize=9)
    return plotstyle.png_bytes(fig)


FIGURES = {"deployment": fig_deployment, "extraction": fig_extraction, "patches": fig_patches,
           "whitebox": fig_whitebox, "examples": fig_examples}


def figures(card: dict) -> dict[str, bytes]:
    return {name: make(card["models"]) for name, make in FIGURES.items()}


# ------------------------------------------------------------------------------------------- text
def _data_line(models: list[dict]) -> str:
    def one(d: dict) -> str:
        return f"{d['name']} ({d['eval']} test images evaluated, {d['heldout']} held out, {d['attacker']} attacker images)"

    if all(m["data"] == models[0]["data"] for m in models):
        return one(models[0]["data"])
    return ", ".join(f"{m['name']}: {one(m['data'])}" for m in models)


def _header_lines(card: dict) -> list[tuple[str, str]]:
    b, env = card["budget"], card["environment"]
    compute = sum(sum(m["seconds"].values()) for m in card["models"])
    cpu = sum(sum(m.get("cpu_seconds", {}).values()) for m in card["models"])
    cpu_text = f" ({cpu:.0f} s of CPU time)" if cpu == cpu and cpu > 0 else ""  # NaN: sections cached by an old card
    return [("budget", f"{b['name']}: the battery ran {compute:.0f} s{cpu_text} on {env['cpu']}, {env['threads']} "
                       f"CPU thread(s) (docs/card.md lists the budget's settings)"),
            ("data", _data_line(card["models"])),
            ("software", f"qrobust {env['qrobust']} ({env['git_commit']}), torch {env['torch']}"),
            ("counting rule", f"every accuracy over {b['evaluations']} evaluations per image: expected = mean, "
                              "strict = correct on all (equal for deterministic models); robust = correct clean and "
                              "attacked")]


def markdown(card: dict, figure_files: dict[str, str]) -> str:
    models = card["models"]
    out = [f"# Robustness card: {' vs '.join(m['name'] for m in models)}", ""]
    out += [f"- **{k}**: {v}" for k, v in _header_lines(card)]
    out += [f"- **{m['name']}**: {m['kind']}; from {m['source']}" for m in models]
    warns = [(m["name"], w) for m in models for w in m["warnings"]]
    out += ["", "## Warnings", ""] + ([f"- **{n}**: {w}" for n, w in warns] or ["- none"])
    out += ["", "## At a glance", "", "| | " + " | ".join(m["name"] for m in models) + " |",
            "|---|" + "---|" * len(models)]
    out += [f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |" for label, rows in glance(models)]
    for section in ("deployment", "extraction", "patches", "whitebox"):
        out += ["", f"## {SECTION_TITLES[section]}", "", SECTION_INTROS[section], ""]
        out += [f"![{section}]({figure_files[section]})", ""]
        out += ["| | " + " | ".join(m["name"] for m in models) + " | attack; budget; rule |",
                "|---|" + "---|" * len(models) + "---|"]
        for label, rows, details in table(models, section):
            cells = [fmt(r) + (f" ({r['na']})" if r and r.get("na") else "") for r in rows]
            out.append(f"| {label} | " + " | ".join(c.replace("|", "/") for c in cells) + f" | {details} |")
    out += ["", "## What the attacks look like", "", f"![examples]({figure_files['examples']})", "",
            "Definitions of every number: docs/card.md in the qrobust repository.", ""]
    return "\n".join(out)


CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d1f23}
main{max-width:1120px;margin:0 auto;padding:24px 28px 48px;background:#fff}
h1{font-size:24px;margin:0 0 6px}h2{font-size:19px;margin:30px 0 6px;border-bottom:2px solid #e3e6ea;padding-bottom:4px}
.meta{font-size:13px;color:#444;margin:2px 0}.meta b{color:#1d1f23}
.intro{font-size:14px;color:#333;max-width:900px}
.warn{background:#fff4e5;border-left:5px solid #d55e00;padding:8px 14px;margin:14px 0;font-size:14px}
.ok{background:#eef7f1;border-left:5px solid #009e73;padding:8px 14px;margin:14px 0;font-size:14px}
img{max-width:100%;height:auto;display:block;margin:10px 0}
table{border-collapse:collapse;width:100%;font-size:13.5px;margin:8px 0}
th,td{padding:5px 8px;border-bottom:1px solid #e6e8eb;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}td.v{font-variant-numeric:tabular-nums;white-space:nowrap;font-weight:600}
td:first-child{min-width:210px}td.d{color:#666;font-size:12px}span.na{color:#888;font-weight:400;font-size:12px;white-space:normal}
"""


GLANCE = (("deployment", "clean_acc"), ("deployment", "int8_agreement_onnx"), ("deployment", "int8_agreement_torch"),
          ("extraction", "clone_acc_none"), ("extraction", "clone_acc_dcp"), ("extraction", "dcp_acc_drop"),
          ("patches", "asr_adaptive_1"), ("patches", "asr_transfer_1"), ("whitebox", "worst_0"), ("whitebox", "worst_1"))


def glance(models: list[dict]) -> list[tuple[str, list[dict | None]]]:
    """The few numbers of the "at a glance" table (each defined in its section below)."""
    out = []
    for section, key in GLANCE:
        rows = [next((r for r in m[section]["rows"] if r["key"] == key), None) for m in models]
        if any(r is not None and not r.get("na") for r in rows):
            out.append((next(r for r in rows if r is not None)["label"], rows))
    return out


def _png_width(png: bytes) -> int:
    return int.from_bytes(png[16:20], "big")  # the IHDR chunk's width


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def page(card: dict, pngs: dict[str, bytes]) -> str:
    models = card["models"]

    def img(name: str) -> str:
        data = base64.b64encode(pngs[name]).decode("ascii")
        width = round(_png_width(pngs[name]) * 96 / plotstyle.DPI)  # shown at screen resolution, sharp on HiDPI
        return f'<img alt="{_esc(name)} figure" width="{width}" src="data:image/png;base64,{data}">'

    parts = [f"<h1>Robustness card: {_esc(' vs '.join(m['name'] for m in models))}</h1>"]
    parts += [f'<p class="meta"><b>{_esc(k)}:</b> {_esc(v)}</p>' for k, v in _header_lines(card)]
    parts += [f'<p class="meta"><b>{_esc(m["name"])}:</b> {_esc(m["kind"])}; from {_esc(m["source"])}</p>'
              for m in models]
    warns = [(m["name"], w) for m in models for w in m["warnings"]]
    if warns:
        parts.append('<div class="warn"><b>Warnings</b><ul>' + "".join(
            f"<li><b>{_esc(n)}:</b> {_esc(w)}</li>" for n, w in warns) + "</ul></div>")
    else:
        parts.append('<div class="ok">No warnings: no attack beat APGD-CE by more than the margin and the '
                     'gradient set-up checks passed.</div>')
    head = "".join(f"<th>{_esc(m['name'])}</th>" for m in models)
    rows = "".join(f"<tr><td>{_esc(label)}</td>" + "".join(f'<td class="v">{_esc(fmt(r))}</td>' for r in rs) + "</tr>"
                   for label, rs in glance(models))
    parts += ["<h2>At a glance</h2>", '<p class="intro">A few of the numbers below, side by side; each is defined '
              "with its attack, budget and counting rule in its section. There is no single score.</p>",
              f"<table><tr><th></th>{head}</tr>{rows}</table>"]
    for section in ("deployment", "extraction", "patches", "whitebox"):
        parts += [f"<h2>{_esc(SECTION_TITLES[section])}</h2>", f'<p class="intro">{_esc(SECTION_INTROS[section])}</p>',
                  img(section)]
        head = "".join(f"<th>{_esc(m['name'])}</th>" for m in models)
        body = []
        for label, rows, details in table(models, section):
            cells = "".join(f'<td class="v">{_esc(fmt(r))}' + (f'<br><span class="na">{_esc(r["na"])}</span>'
                                                               if r and r.get("na") else "") + "</td>" for r in rows)
            body.append(f"<tr><td>{_esc(label)}</td>{cells}<td class=\"d\">{_esc(details)}</td></tr>")
        parts.append(f"<table><tr><th></th>{head}<th>attack; budget; counting rule</th></tr>{''.join(body)}</table>")
    parts += ["<h2>What the attacks look like</h2>", img("examples"),
              '<p class="intro">Every number, its attack, budget and counting rule: docs/card.md in qrobust.</p>']
    title = _esc("qrobust card: " + " vs ".join(m["name"] for m in models))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>\n")
