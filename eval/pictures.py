"""Pictures a newcomer can read (matplotlib, PNG): the router map of a sampling run, quality
against FLOPs, sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SKIPPED, REUSED = 0, -1
WIDTH_LABELS = ("1/4", "1/2", "3/4", "full")


def routing_categories(executed: np.ndarray, bucket: np.ndarray | None, cache_hit: np.ndarray | None) -> np.ndarray:
    """[S, L] codes: 0 skipped, 1 + k computed at width bucket k, -1 reused from the cache."""
    executed = np.asarray(executed, bool)
    bucket = np.full(executed.shape, 3) if bucket is None else np.asarray(bucket)
    codes = np.where(executed, 1 + bucket, SKIPPED)
    if cache_hit is not None:
        codes = np.where(np.asarray(cache_hit, bool), REUSED, codes)
    return codes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.savefig(path)
    _pyplot().close(fig)
    return Path(path)


def plot_router_map(path: str | Path, executed, bucket=None, cache_hit=None, *, title: str = "",
                    block_groups: list[tuple[str, int]] | None = None) -> Path:
    """`router_map_figure` as a PNG at `path`.

    Args:
      path: the PNG to write; the others: as `router_map_figure`'s.
    """
    return _save(router_map_figure(executed, bucket, cache_hit, title=title, block_groups=block_groups), path)


def router_map_figure(executed, bucket=None, cache_hit=None, *, title: str = "",
                      block_groups: list[tuple[str, int]] | None = None):
    """One sample's routing as a grid, denoising steps down, blocks across ([S, L] inputs):
    grey skipped, blues computed (darker = wider MLP), green reused from the cache.

    block_groups: [(name, count)] of the block stacks in order (FLUX: double, single), drawn as
    separated spans of the x axis, named above it.

    Args:
      executed, bucket, cache_hit: [S, L] of one sample. title: the figure's. block_groups: above.
    """
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    codes = routing_categories(executed, bucket, cache_hit)
    steps, blocks = codes.shape
    colors = ["#2ca02c", "#e8e8e8", "#c6dbef", "#6baed6", "#2171b5", "#08306b"]  # reused, skipped, widths
    fig, ax = plt.subplots(figsize=(max(8.0, 0.28 * blocks + 4.0), max(3.5, 0.22 * steps + 1.8)), dpi=120)
    ax.imshow(codes + 1, cmap=ListedColormap(colors), vmin=0, vmax=len(colors) - 1, aspect="auto",
              interpolation="nearest")
    ax.set_xlabel("block (scan order)")
    ax.set_ylabel("denoising step (0 = pure noise)")
    ax.set_xticks(np.arange(0, blocks, max(1, blocks // 20)))
    ax.set_yticks(np.arange(0, steps, max(1, steps // 15)))
    ax.set_xticks(np.arange(-0.5, blocks), minor=True)
    ax.set_yticks(np.arange(-0.5, steps), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    if block_groups:  # the stacks' names on an axis of their own above the grid: the title sits above it
        starts = np.cumsum([0] + [count for _, count in block_groups])
        for start in starts[1:-1]:
            ax.axvline(start - 0.5, color="black", linewidth=1.5)
        groups = ax.secondary_xaxis("top")
        groups.set_xticks([start + count / 2 - 0.5 for start, (_, count) in zip(starts, block_groups)],
                          [name for name, _ in block_groups], fontsize=8)
        groups.tick_params(length=0)
    computed = codes > 0
    ax.set_title(f"{title}\nblocks computed {computed.mean():.0%}, reused {np.mean(codes == REUSED):.0%}, "
                 f"skipped {np.mean(codes == SKIPPED):.0%}", fontsize=10)
    legend = [Patch(color=colors[1], label="skipped"), Patch(color=colors[0], label="reused (cache)")]
    legend += [Patch(color=colors[2 + k], label=f"computed, MLP width {w}") for k, w in enumerate(WIDTH_LABELS)]
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def block_groups(config) -> list[tuple[str, int]]:
    """The block stacks of a model config as (name, count), in scan order."""
    if getattr(config, "num_single_layers", 0):
        return [("double-stream", config.num_layers), ("single-stream", config.num_single_layers)]
    return [("blocks", config.num_layers)]


def plot_quality_vs_flops(path: str | Path, curves: dict[str, list[tuple[float, float]]], **kwargs) -> Path:
    """`quality_vs_flops_figure` as a PNG at `path`."""
    return _save(quality_vs_flops_figure(curves, **kwargs), path)


def quality_vs_flops_figure(curves: dict[str, list[tuple[float, float]]], *, ylabel: str, title: str,
                            dense: float | None = None, lower_is_better: bool = False,
                            notes: dict[str, str] | None = None):
    """One line per method through its (FLOPs relative to dense, quality) points, sorted by FLOPs;
    dense's FLOPs (1.0) always in range, as a dotted vertical line, and `dense` quality as a dashed
    horizontal one. notes: {method: text} written beside that method's points. A distance
    (lower_is_better) whose values span more than 4x goes on a log axis, so that one method's
    collapse leaves the others readable.

    Args:
      curves: {method: [(FLOPs vs dense, quality), ...]}. ylabel, title: the figure's.
      dense: dense's quality (None: no line). lower_is_better: say so on the axis. notes: above.
    """
    fig, ax = _pyplot().subplots(figsize=(7.5, 4.8), dpi=120)
    markers = "osD^v<>pP*"
    for i, (name, points) in enumerate(curves.items()):
        points = sorted(points)
        # hollow, each method smaller than the one before: points that coincide still show as nested marks
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], label=name,
                markersize=max(11 - 2 * i, 4), markerfacecolor="none", markeredgewidth=1.5)
        for x, y in points if name in (notes or {}) else []:
            ax.annotate(notes[name], (x, y), xytext=(-8, -14), textcoords="offset points", ha="right", fontsize=7)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1, label="dense's FLOPs")
    if dense is not None:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
        ax.plot([1.0], [dense], marker="*", color="black", markersize=10)
    xs = [x for points in curves.values() for x, _ in points] + [1.0]
    ax.set_xlim(0.0, max(xs) * 1.08)
    ys = [y for points in curves.values() for _, y in points] + ([] if dense is None else [dense])
    log_y = lower_is_better and min(ys) > 0 and max(ys) > 4 * min(ys)  # a collapse would flatten every other line
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("FLOPs per sample relative to dense (routers counted)")
    ax.set_ylabel(ylabel + (" (lower is better)" if lower_is_better else "") + (", log scale" if log_y else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_sample_grid(path: str | Path, images: np.ndarray, labels: np.ndarray, *, title: str, columns: int = 10) -> Path:
    """`sample_grid_figure` as a PNG at `path`.

    Args:
      path: the PNG to write; the others: as `sample_grid_figure`'s.
    """
    return _save(sample_grid_figure(images, labels, title=title, columns=columns), path)


def sample_grid_figure(images: np.ndarray, labels: np.ndarray, *, title: str, columns: int = 10):
    """Images [M, H, W] in [0, 1] in a grid, each titled with the label it was conditioned on. The grid
    is one picture on one axes (a figure of M small axes takes seconds to lay out and draw).

    Args:
      images: [M, H, W] in [0, 1]. labels: [M]. title: the figure's. columns: images per row.
    """
    plt = _pyplot()
    images = np.asarray(images, np.float32)
    count, height, width = images.shape
    rows, columns = -(-count // columns), min(columns, count)
    gap = max(1, height // 4)  # background between cells, in image pixels
    mosaic = np.ones((rows * (height + gap) - gap, columns * (width + gap) - gap), np.float32)
    for i, image in enumerate(images):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        mosaic[top:top + height, left:left + width] = image
    fig, ax = plt.subplots(figsize=(1.1 * columns, 1.25 * rows + 0.6), dpi=100)
    ax.imshow(mosaic, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest", extent=(0, mosaic.shape[1], mosaic.shape[0], 0))
    ax.axis("off")
    for i, label in enumerate(labels[:count]):
        x, y = (i % columns) * (width + gap) + width / 2, (i // columns) * (height + gap)
        ax.text(x, y - gap / 4, f"label {label}", fontsize=7, ha="center", va="bottom")
    ax.set_ylim(mosaic.shape[0], -gap * 1.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_mesh_preview(path: str | Path, vertices: np.ndarray, faces: np.ndarray, *, title: str) -> Path:
    """`mesh_preview_figure` as a PNG at `path`.

    Args:
      path: the PNG to write; the others: as `mesh_preview_figure`'s.
    """
    return _save(mesh_preview_figure(vertices, faces, title=title), path)


def mesh_preview_figure(vertices: np.ndarray, faces: np.ndarray, *, title: str, max_faces: int = 60000):
    """A shaded view of a triangle mesh from two sides (front and three-quarter), its box's units
    on the axes; at most `max_faces` triangles drawn (evenly taken) so large meshes stay quick.

    Args:
      vertices: [V, 3] float, x right, y up, z towards the viewer (hy3dgen's meshes). faces: [F, 3]
        vertex indices. title: above both views. max_faces: above.
    """
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    plt = _pyplot()
    faces = np.asarray(faces)[:: max(1, len(faces) // max_faces)]
    triangles = np.asarray(vertices, np.float64)[faces][..., [0, 2, 1]]  # plot with y up
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.linalg.norm(normals, axis=1, keepdims=True) + 1e-12
    light = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    shade = 0.35 + 0.65 * np.abs(normals @ light)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    fig = plt.figure(figsize=(9, 4.8))
    for i, (azim, name) in enumerate(((-90, "front"), (-45, "three-quarter"))):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        ax.add_collection3d(Poly3DCollection(triangles, facecolors=plt.cm.Greys(0.25 + 0.6 * shade)[:, :3],
                                             edgecolor="none"))
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[2], hi[2]), ax.set_zlim(lo[1], hi[1])
        ax.set_box_aspect(hi[[0, 2, 1]] - lo[[0, 2, 1]] + 1e-6)
        ax.view_init(elev=15, azim=azim)
        ax.set_xlabel("x"), ax.set_ylabel("z"), ax.set_zlabel("y")
        ax.set_title(f"{name} view")
    fig.suptitle(f"{title}\n{len(vertices):,} vertices, {len(np.asarray(faces)):,} faces drawn")
    fig.tight_layout()
    return fig
