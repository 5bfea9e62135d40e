"""qrobust.plotstyle (issue 15 section 4): legends that fit their figure, PNG output in the style."""

import pytest

from qrobust import plotstyle


@pytest.mark.parametrize("width", [4.0, 9.0])
def test_legend_below_stays_inside_the_figure(width):
    fig, axes = plotstyle.figure(1, 1, width=width, height=3.0)
    labels = ["defender, no defense", "clone, no defense", "defender with DCP", "clone with DCP"]
    for k, label in enumerate(labels):
        axes[0][0].bar([k], [0.5], label=label)
    plotstyle.legend_below(fig, *axes[0][0].get_legend_handles_labels())
    png = plotstyle.png_bytes(fig)  # draws the figure: the legend's extent is known after this
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    legend_box = fig.legends[0].get_window_extent()
    fig_box = fig.bbox
    assert legend_box.x0 >= fig_box.x0 - 1 and legend_box.x1 <= fig_box.x1 + 1, (legend_box, fig_box)
    if width == 4.0:  # four long labels do not fit one row of a 4-inch figure: more rows
        assert fig.legends[0]._ncols < len(labels)


def test_wrap_labels_and_colors():
    assert plotstyle.wrap_labels(["a long tick label here"], 10) == ["a long\ntick label\nhere"]
    assert plotstyle.colors(10)[8] == plotstyle.PALETTE[0]


def test_series_style_never_repeats_a_look_for_many_series():
    looks = [tuple(sorted(plotstyle.series_style(k).items())) for k in range(3 * len(plotstyle.PALETTE))]
    assert len(set(looks)) == len(looks)  # colour repeats after the palette; line, marker, fill do not all
    first, ninth = plotstyle.series_style(0), plotstyle.series_style(len(plotstyle.PALETTE))
    assert first["color"] == ninth["color"] and first["linestyle"] == "-" and ninth["linestyle"] == "--"
    assert ninth["markerfacecolor"] == "none" and ninth["marker"] != first["marker"]


def test_save_png_writes_one_file_and_styled_applies_the_style(tmp_path):
    import matplotlib
    from matplotlib.figure import Figure

    @plotstyle.styled
    def draw(path):
        fig = Figure(figsize=(3, 2), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1])
        plotstyle.save_png(fig, path)
        return ax.spines["top"].get_visible(), matplotlib.rcParams["axes.grid"]

    top_spine, grid = draw(tmp_path / "f.png")
    assert not top_spine and grid  # matplotlib defaults: top spine shown, no grid
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # no temporary file left
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
