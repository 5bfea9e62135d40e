"""One figure style for qrobust's PNGs (the robustness card; the studies can adopt it).

Legible at the size a report shows them (about 600-1000 px wide): 10-11 pt text at 150 dpi, a
colour-blind-safe palette (Okabe & Ito 2008, "Color Universal Design"), light horizontal grid lines only,
no top/right spines, value labels on bars, legends under the axes in as many columns as fit.
Matplotlib's object API (``Figure``, no ``pyplot``): no global state, safe in threads and workers.

    fig, axes = plotstyle.figure(1, 2, width=9, height=3.2, sharey=True)
    bars = axes[0].bar(names, values, color=plotstyle.colors(len(names)))
    plotstyle.label_bars(axes[0], bars, "{:.0%}")
    png = plotstyle.png_bytes(fig)            # write it with qrobust.runs.atomic_write_bytes
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

from qrobust.fileio import atomic_write_bytes

# Okabe-Ito: distinguishable with every common colour-vision deficiency, and in grey print
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 150

RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.grid.axis": "y",
    "grid.color": "#dddddd",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "lines.linewidth": 2.0,
    "lines.markersize": 6,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.facecolor": "white",
    "axes.prop_cycle": None,  # set below (needs matplotlib's cycler)
}


def _rc() -> dict:
    from cycler import cycler

    return {**RC, "axes.prop_cycle": cycler(color=PALETTE)}


@contextmanager
def style():
    """Matplotlib's settings of this style for the block (creation and drawing both read them)."""
    import matplotlib

    with matplotlib.rc_context(_rc()):
        yield


def styled(function):
    """Decorator: ``function`` runs inside :func:`style` (figures and axes it makes with matplotlib's
    object API get this style; a study's plotting function needs only this line)."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with style():
            return function(*args, **kwargs)

    return wrapper


def colors(n: int) -> list[str]:
    """``n`` palette colours (cycled when ``n`` exceeds the palette)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


def series_style(k: int) -> dict:
    """Line keywords (``color``, ``marker``, ``linestyle``, ``markerfacecolor``) for the ``k``-th series of
    a plot: the palette and markers, solid and filled for the first ``len(PALETTE)``; beyond, the colours
    repeat with a dashed line, hollow markers and another marker, so no two series look alike."""
    n = len(PALETTE)
    color = PALETTE[k % n]
    lap = k // n
    return {"color": color, "marker": MARKERS[(k + 3 * lap) % len(MARKERS)],
            "linestyle": ("-", "--", ":", "-.")[lap % 4], "markerfacecolor": color if lap == 0 else "none"}


def figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 3.2, sharey: bool = False,
           squeeze: bool = False):
    """A ``Figure`` of ``width x height`` inches with ``nrows x ncols`` axes in this style (a 2-D array of
    axes unless ``squeeze``); laid out with matplotlib's constrained layout, so labels do not overlap."""
    from matplotlib.figure import Figure

    with style():
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, sharey=sharey, squeeze=squeeze)
    return fig, axes


def percent_axis(ax, top: float = 1.0) -> None:
    """y axis as percentages from 0 to ``top`` (a share), ticks every 20 points."""
    from matplotlib.ticker import MultipleLocator, PercentFormatter

    ax.set_ylim(0, top * 1.08)  # room for the value labels above full bars
    ax.yaxis.set_major_locator(MultipleLocator(0.2 if top >= 0.5 else 0.1))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def label_bars(ax, bars: Iterable, fmt: str = "{:.0%}", *, values: Sequence[float] | None = None,
               missing: str = "n/a") -> None:
    """Write each bar's value above it; ``values`` (default: the bar heights) may hold NaN for a missing
    number, written as ``missing`` above a bar drawn at height 0."""
    import math

    bars = list(bars)
    values = [bar.get_height() for bar in bars] if values is None else list(values)
    with style():
        for bar, v in zip(bars, values, strict=True):
            gone = v is None or (isinstance(v, float) and math.isnan(v))
            ax.annotate(missing if gone else fmt.format(v), (bar.get_x() + bar.get_width() / 2, 0 if gone else v),
                        xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=8,
                        color="#888888" if gone else "#333333")


def wrap_labels(labels: Sequence[str], width: int = 12) -> list[str]:
    """Tick labels wrapped at ``width`` characters so neighbouring labels do not run together."""
    import textwrap

    return ["\n".join(textwrap.wrap(str(t), width)) or str(t) for t in labels]


def legend_entries(axes: Iterable, order: Sequence[str] | None = None) -> tuple[list, list[str]]:
    """Handles and labels of all ``axes``, one per label, in ``order`` (labels not in it last) or first
    seen first: for one figure legend when some panels lack a series."""
    entries: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    rank = {name: i for i, name in enumerate(order or [])}
    labels = sorted(entries, key=lambda k: rank.get(k, len(rank)))  # sorted() is stable: first seen first
    return [entries[k] for k in labels], labels


def legend_below(fig, handles: Sequence, labels: Sequence[str]) -> None:
    """A figure legend under the axes, in as many columns as fit the figure's width (rows of entries
    otherwise run off the edge: matplotlib does not wrap a legend)."""
    if not labels:
        return
    fontsize = RC["legend.fontsize"]
    # an entry: handle (2 em) + gap (0.8 em) + text (~0.6 em per character) + column gap (2 em), in inches
    entry = max((2.8 + 0.6 * len(str(t)) + 2.0) * fontsize / 72 for t in labels)
    ncol = max(1, min(len(labels), int(fig.get_figwidth() * 0.95 // entry)))
    with style():
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol)


def png_bytes(fig, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (drawn in this style)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    with style():
        FigureCanvasAgg(fig)
        fig.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


def save_png(fig, path) -> None:
    """Write the figure as a PNG file at ``path``, atomically (:func:`qrobust.fileio.atomic_write_bytes`)."""
    atomic_write_bytes(path, png_bytes(fig), fsync=False)


__all__ = ["DPI", "MARKERS", "PALETTE", "RC", "colors", "figure", "label_bars", "legend_below", "legend_entries",
           "percent_axis", "png_bytes", "save_png", "series_style", "style", "styled", "wrap_labels"]
