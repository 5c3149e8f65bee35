"""`edit-jax demo`: the fidelity demo on real digits."""

from __future__ import annotations

import sys

from edit_jax.cli.common import at_least, check_output_folder
from edit_jax.eval.demo import EXPECTED, SETTINGS, DemoError, markdown_table, run_demo, with_overrides


def cmd_demo(args) -> int:
    import dataclasses

    name = "full" if args.full else args.settings
    settings = with_overrides(SETTINGS[name], args.set)
    if args.seed is not None:
        if settings.seed != SETTINGS[name].seed and settings.seed != args.seed:
            raise DemoError(f"--seed {args.seed} and --set seed={settings.seed} disagree: give the seed once")
        settings = dataclasses.replace(settings, seed=args.seed)
    out = check_output_folder(args.out, "demo")
    print(f"edit-jax demo ({name} settings{', changed' if args.set else ''}): {EXPECTED[name]} on 2 CPU cores; "
          f"a rerun reuses what {out}/ already holds", file=sys.stderr)
    summary = run_demo(settings, out, progress=not args.quiet)
    print(markdown_table(summary["methods"]))
    print(f"\n{summary['seconds'] / 60:.1f} minutes; table, JSON and pictures in {out}/ (results.md, results.json, "
          "quality_vs_flops.png, fd_vs_flops.png, reuse_vs_caches_fd.png, reuse_vs_caches_psnr.png, router_map.png, "
          "samples/)")
    return 0


DEMO_HELP = """writes OUT/results.md and results.json (one row per method: blocks run, FLOPs vs dense,
wall-clock, class accuracy, Frechet distance, PSNR/SSIM vs dense), quality_vs_flops.png,
fd_vs_flops.png, reuse_vs_caches_fd.png and _psnr.png, router_map.png and samples/*.png; trained
checkpoints in OUT/runs."""


def add_demo(command) -> None:
    demo = command("demo", "train a small DiT and E-DiT routers on real digits; judge them against dense, static "
                           "pruning, a per-step schedule and the cache at equal FLOPs (no downloads)", DEMO_HELP)
    demo.add_argument("--full", action="store_true",
                      help="28x28 MNIST, 10 blocks, a sweep of three gate budgets (about 30 minutes on 2 cores)")
    demo.add_argument("--settings", default="default", choices=["default", "tiny"],
                      help="default: 8x8 digits, 6 blocks, one budget (3.5 to 4.5 minutes); tiny: about a minute, for tests")
    demo.add_argument("--out", default="edit-jax-demo", help="output folder; a rerun reuses its trained checkpoints")
    demo.add_argument("--seed", type=at_least(0), default=None,
                      help="seed of the data split, weights, training and noise (default 0; the same as --set seed=N)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="change one setting (eval/demo.py DemoSettings), e.g. --set rho_g=[0.6,0.4] "
                           "--set rho_schedule=linear; give another --out for other settings")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=cmd_demo)
