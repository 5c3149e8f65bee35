"""greedy_vs_taylor_seer.png from greedy_schedule.json, swap_from_taylor_seer.json,
per_sample_oracle.json and the two demo runs' results.json here: distance to dense (PSNR) and to
the real digits (Frechet distance) against FLOPs for the searched maps, TaylorSeer, the
per-sample oracle and the schedules trained on the final sample.

    python plot.py"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent


def points(rows, prefix):
    rows = sorted((r for r in rows if r["method"].startswith(prefix)), key=lambda r: r["flops_vs_dense"])
    return [r["flops_vs_dense"] for r in rows], rows


def main() -> None:
    greedy = json.loads((HERE / "greedy_schedule.json").read_text())
    swap = json.loads((HERE / "swap_from_taylor_seer.json").read_text())
    oracle = json.loads((HERE / "per_sample_oracle.json").read_text())
    trained = [r for d in ("results.json", "lr0.01/results.json") for r in json.loads((HERE / d).read_text())["methods"]
               if r["method"].startswith("learned per-step reuse schedule")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, label in ((axes[0], "psnr_vs_dense_db", "PSNR to dense's samples (dB, higher is closer)"),
                           (axes[1], "frechet_distance", "Frechet distance to real digits (lower is better)")):
        for prefix, style, name in (("greedy", "o-", "map searched greedily on the final sample"),
                                    ("TaylorSeer", "s", "TaylorSeer (first order), intervals 2 to 8")):
            x, rows = points(greedy, prefix)
            ax.plot(x, [r[key] for r in rows], style, label=name)
        x, rows = points(oracle, "per-sample oracle")
        ax.plot(x, [r[key] for r in rows], "D--", label="per-sample oracle: each sample's own map, searched on its own "
                                                       "dense sample")
        ax.plot([r["flops_vs_dense"] for r in trained], [r[key] for r in trained], "^", markersize=9,
                label="schedule trained on the final sample (lr 0.05; lr 0.01 stays at the map)")
        after = swap[-1]
        ax.plot([after["flops_vs_dense"]], [after[key]], "*", markersize=12, label="TaylorSeer's map after two swaps")
        ax.set_xlabel("FLOPs vs dense")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(greedy[0]["frechet_distance"], color="gray", lw=0.8, label="dense")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    fig.suptitle("Reuse maps on the 8x8 digits, per step and per sample (6 blocks, 12 steps, 200 test labels)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(HERE / "greedy_vs_taylor_seer.png", dpi=120)


if __name__ == "__main__":
    main()
