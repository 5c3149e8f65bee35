"""The pictures a newcomer reads: nothing drawn over anything else, the reference always in view."""

import numpy as np

from edit_jax.eval.pictures import quality_vs_flops_figure, router_map_figure


def _boxes(fig, artists):
    renderer = fig.canvas.get_renderer()
    return [a.get_window_extent(renderer) for a in artists if a.get_text()]


def test_the_router_maps_stack_names_never_overlap_its_two_line_title():
    steps, blocks = 4, 6
    fig = router_map_figure(np.ones((steps, blocks), bool), title="E-DiT + cache routing of prompt 0\nsecond part",
                            block_groups=[("double-stream", 2), ("single-stream", 4)])
    fig.canvas.draw()
    ax = fig.axes[0]
    (groups,) = ax.child_axes
    names = _boxes(fig, groups.get_xticklabels())
    title = _boxes(fig, [ax.title])[0]
    assert [t.get_text() for t in groups.get_xticklabels()] == ["double-stream", "single-stream"]
    assert all(not box.overlaps(title) and box.y1 <= title.y0 for box in names)


def test_a_quality_plot_always_shows_dense_flops_and_a_method_that_costs_more():
    fig = quality_vs_flops_figure({"E-DiT": [(1.09, 30.0)], "E-DiT + cache": [(0.7, 28.0)]}, ylabel="PSNR", title="t",
                                  notes={"E-DiT": "every block ran: its gap to dense is float rounding"})
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    assert low <= 0.7 and high > 1.09
    assert any(list(line.get_xdata()) == [1.0, 1.0] for line in ax.get_lines())  # dense's FLOPs, as a vertical line
    assert [t.get_text() for t in ax.texts] == ["every block ran: its gap to dense is float rounding"]


def test_a_quality_plot_of_cheap_methods_still_reaches_dense_flops():
    ax = quality_vs_flops_figure({"cache": [(0.3, 1.0), (0.5, 2.0)]}, ylabel="q", title="t").axes[0]
    assert ax.get_xlim()[1] >= 1.0


def test_a_distance_plot_with_one_collapsed_method_reads_on_a_log_axis():
    curves = {"cache": [(0.3, 26.0), (0.5, 24.5)], "collapsed": [(0.2, 150.0), (0.3, 33.0)]}

    def scale(curves, **kwargs):
        return quality_vs_flops_figure(curves, ylabel="FD", title="t", **kwargs).axes[0].get_yscale()

    assert scale(curves, dense=24.0, lower_is_better=True) == "log"
    assert scale({"cache": curves["cache"]}, lower_is_better=True) == "linear"
    assert scale({"accuracy": [(0.3, 0.1), (0.5, 0.8)]}) == "linear"  # a score, not a distance
