"""Zero-training check: TaylorSeer's own compute map as a forced per-step schedule for every block,
with residual reuse of order 0 and 1 (LearnedReuse), against TaylorSeer itself (output-space Taylor).

    python its_map_without_training.py DEMO_OUT [--set KEY=VALUE ...]

DEMO_OUT: a folder `edit-jax demo` ran in with the same settings (its dense model is reused).
Output: its_map_without_training.txt beside this file."""
import json, sys, types
import jax.numpy as jnp, numpy as np
from pathlib import Path
from edit_jax.eval import demo as D
from edit_jax.eval.sampling_eval import run_method
from edit_jax.elastic.block_cache import LearnedReuse
from edit_jax.elastic.mechanism import ElasticConfig
from edit_jax.elastic.step_cache import TaylorSeer
from edit_jax.sampling.sampler import SamplerConfig
from edit_jax.sampling.step_schedule import ScheduleDecisions

out = Path(sys.argv[1]); s = D.with_overrides(D.SETTINGS["default"], sys.argv[2:])
demo = D.Demo(s, out, progress=False)
demo.prepare_data(); demo.fit_judge(); demo.train_dense()
demo.samples = []; demo.bar = types.SimpleNamespace(update=lambda n: None, set_postfix_str=lambda x: None)
noise, cond = demo.conditions(); sampler = SamplerConfig(num_steps=s.sample_steps)
lat, stats, _ = run_method(demo.model, demo.base, noise, cond, sampler, repeats=1, timing_rows=2)
demo.dense_images = demo.images(lat); rows = [demo.judge_method("dense", lat, stats)]
L, S, full = demo.config.num_blocks, s.sample_steps, len(demo.config.width_buckets) - 1
for interval, before, after in ((2, 1, 10), (3, 1, None), (4, 1, None)):
    ts = TaylorSeer(cache_interval=interval, disable_cache_before_step=before, disable_cache_after_step=after, max_order=1, factors_dtype="float32")
    lat, stats, _ = run_method(demo.model, demo.base, noise, cond, sampler, elastic=ElasticConfig(mode="dense", step_cache=ts), repeats=1, timing_rows=2)
    rows.append(demo.judge_method(f"TaylorSeer k={interval}", lat, stats))
    computes = np.array([bool(ts.computes_at(jnp.asarray(i))) for i in range(S)])
    table = ScheduleDecisions(jnp.asarray(np.repeat(computes[:, None], L, 1)), jnp.full((S, L), full, jnp.int32))
    for order in (0, 1):
        el = ElasticConfig(mode="forced", block_cache=LearnedReuse(S, order))
        lat, stats, _ = run_method(demo.model, demo.base, noise, cond, sampler, None, el, decisions=table, repeats=1, timing_rows=2)
        rows.append(demo.judge_method(f"its map, residual reuse order {order}", lat, stats))
for r in rows:
    print(f"{r['method']:40s} {r['flops_vs_dense']:.3f}  FD {r['frechet_distance']:.2f}  PSNR {r.get('psnr_vs_dense_db', 'inf')}  acc {r['class_accuracy']:.3f}")
