"""The pictures a newcomer reads: nothing drawn over anything else, the reference always in view."""

import numpy as np

from edit_jax.eval.pictures import quality_vs_flops_figure, router_map_figure, sample_grid_figure


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


def test_a_sample_grid_shows_each_image_in_its_cell_under_its_own_label():
    images = np.stack([np.full((8, 8), i / 12) for i in range(12)])
    fig = sample_grid_figure(images, np.arange(12) % 10, title="dense: samples conditioned on the label above each",
                             columns=5)
    fig.canvas.draw()
    (ax,) = fig.axes
    mosaic = ax.get_images()[0].get_array()
    assert mosaic.shape == (3 * 8 + 2 * 2, 5 * 8 + 4 * 2)  # 3 rows of 5 cells, 2 pixels between them
    assert all(np.allclose(mosaic[r * 10:r * 10 + 8, c * 10:c * 10 + 8], (5 * r + c) / 12)
               for r in range(3) for c in range(5) if 5 * r + c < 12)
    assert [t.get_text() for t in ax.texts] == [f"label {i % 10}" for i in range(12)]
    labels, title = _boxes(fig, ax.texts), _boxes(fig, [fig._suptitle])[0]
    assert not any(a.overlaps(b) for i, a in enumerate(labels) for b in labels[i + 1:])
    assert all(box.y1 <= title.y0 for box in labels)
