"""The benchmark scripts run end to end on tiny configs and report what BENCHMARKS.md records
(timings themselves are never asserted)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from edit_jax.eval import bench_elastic, profile_step


@pytest.fixture(scope="module")
def flux_tiny_elastic(tmp_path_factory):
    """bench_elastic on flux-tiny, once for this module's tests: (its result, the JSON file it wrote)."""
    out = tmp_path_factory.mktemp("elastic") / "elastic.json"
    return bench_elastic.main(["--preset", "flux-tiny", "--height", "4", "--width", "4", "--txt", "8", "--runs", "2",
                               "--out", str(out)]), out


def test_elastic_benchmark_reports_speedup_beside_flop_reduction(flux_tiny_elastic):
    result, out = flux_tiny_elastic

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    check_elastic_benchmark(result)


def check_elastic_benchmark(result: dict) -> None:
    """The elastic benchmark (here on flux-tiny; the GPU suite's dry run checks its run on
    qwen-image-tiny) times dense, the forced pattern and the routers, beside their FLOPs."""
    assert {"dense", "forced_pattern", "skips_only", "routers_all_open", "routers_all_open_modulation_ahead"} <= set(result["median_ms"])
    assert result["forced"]["flop_reduction"] > 1
    assert result["routers_overhead"]["flops"] > 0


def test_elastic_benchmark_of_a_large_model_on_cpu_times_dense_and_the_forced_pattern_alone(tmp_path):
    result = bench_elastic.main(["--preset", "hunyuan3d-tiny", "--height", "1", "--width", "12", "--txt", "5",
                                 "--runs", "2", "--forced-only"])

    assert set(result["median_ms"]) == {"dense", "forced_pattern"} and result["routers_overhead"] is None
    assert result["forced"]["flop_reduction"] > 2


@pytest.mark.parametrize("preset", ["flux-tiny", "qwen-image-tiny"])
def test_forward_benchmark_times_ours_beside_diffusers_eager_on_the_same_weights_per_batch(preset, tmp_path):
    from edit_jax.eval import bench_forward

    result = bench_forward.main(["--preset", preset, "--batch", "1", "2", "--height", "4", "--width", "4", "--txt", "8",
                                 "--runs", "2", "--warmup", "1", "--out", str(tmp_path / "forward.json")])
    assert set(result["by_batch"]) == {"1", "2"}
    for row in result["by_batch"].values():
        assert set(row["median_ms"]) == {"edit_jax", "diffusers_eager"} and row["ratio_edit_jax_over"]["diffusers_eager"] > 0
        assert row["relative_error_vs_diffusers"] <= 1e-5


def test_forward_benchmark_times_diffusers_compiled_block_by_block_beside_eager(tmp_path):
    from edit_jax.eval import bench_forward

    result = bench_forward.main(["--preset", "flux-tiny", "--height", "4", "--width", "4", "--txt", "8", "--runs", "2",
                                 "--warmup", "1", "--compile", "regional", "--out", str(tmp_path / "forward.json")])
    row = result["by_batch"]["1"]
    assert result["torch_compile"] == "regional" and row["torch_compile_s"] > 0
    assert set(row["ratio_edit_jax_over"]) == {"diffusers_eager", "diffusers_compiled"}
    assert row["relative_error_vs_diffusers"] <= 1e-5


def test_qk_norm_rope_benchmark_times_both_forms_of_the_same_values(tmp_path):
    from edit_jax.eval import bench_qk_norm_rope

    result = bench_qk_norm_rope.main(["--tokens", "16", "--heads", "2", "--head-dim", "16", "--layers", "2",
                                      "--dtype", "float32", "--runs", "2", "--out", str(tmp_path / "qk.json")])
    assert set(result["ms_per_layer"]) == {"two_passes", "one_pass"} and result["one_pass_over_two_passes"] > 0
    assert result["relative_difference"] <= 1e-6


def test_router_pool_benchmark_times_both_forms_of_the_same_mean(tmp_path):
    from edit_jax.eval import bench_router_pool

    result = bench_router_pool.main(["--tokens", "16", "--dim", "32", "--hidden", "8", "--layers", "2",
                                     "--dtype", "float32", "--runs", "2", "--out", str(tmp_path / "pool.json")])
    assert set(result["ms_per_layer"]) == {"matmul_mean", "fused_sum"} and result["fused_sum_over_matmul_mean"] > 0
    assert result["relative_difference"] <= 1e-6


def test_router_benchmark_reports_the_routers_time_and_flops_as_shares_of_the_dense_forward(tmp_path):
    from edit_jax.eval import bench_router

    result = bench_router.main(["--preset", "flux-tiny", "--height", "4", "--width", "4", "--txt", "8", "--runs", "2",
                                "--out", str(tmp_path / "router.json")])
    assert set(result["median_ms"]) == {"dense", "router_prelude", "routers"}
    assert all(v > 0 for v in result["share_of_dense"].values())
    assert json.loads((tmp_path / "router.json").read_text()) == json.loads(json.dumps(result))


def test_elastic_benchmark_leaves_out_the_comparison_a_pattern_cannot_have(flux_tiny_elastic):
    # flux-tiny: 1 double + 1 single block; the pattern skips the single one, and a FLUX model
    # needs at least one single block, so there is no dense model without the skipped blocks
    result, _ = flux_tiny_elastic

    assert "dense_without_skipped_blocks" not in result["median_ms"]
    assert result["skip_mechanism_overhead"] is None


def test_step_profile_splits_device_time_between_routers_blocks_and_the_rest_and_keeps_its_hlo(tmp_path):
    # a program of its own: the CPU profiler records XLA ops only when a flag is set before JAX starts
    out, hlo = tmp_path / "profile.json", tmp_path / "hlo.txt.gz"
    subprocess.run([sys.executable, "-m", "edit_jax.eval.profile_step", "--preset", "flux-tiny", "--height", "4", "--width", "4",
                    "--txt", "8", "--mode", "infer", "--steps", "1", "--out", str(out), "--hlo-out", str(hlo)],
                   check=True, capture_output=True, cwd=Path(__file__).parents[1])
    result = json.loads(out.read_text())

    scopes = result["by_scope"]
    assert scopes["elastic_router"]["op_calls"] > 0 and scopes["elastic_block"]["op_calls"] > 0
    assert sum(s["ms"] for s in scopes.values()) == pytest.approx(result["op_ms_per_step"], abs=2e-3)  # each rounded to 1 us
    assert {row["scope"] for row in result["top_ops"]} <= {"elastic_router", "elastic_block", "other"}
    assert all(row["scope"] == scope for scope, rows in result["top_ops_by_scope"].items() for row in rows)
    assert result["top_ops_by_scope"]["elastic_router"] and "--xla_gpu_enable_command_buffer=" in result["xla_flags"]
    text = gzip.decompress(hlo.read_bytes()).decode()
    assert text.startswith("HloModule") and all(row["op"] in text for row in result["top_ops"])


def test_op_names_map_hlo_instructions_to_their_scopes_and_flag_control_flow():
    def f(x):
        with jax.named_scope("elastic_router"):
            y = jnp.sin(x).sum()
        return jax.lax.cond(y > 0, lambda x: x @ x, lambda x: x, x)

    names, containers = profile_step.op_names(jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text())

    assert any(profile_step.scope_of(n) == "elastic_router" for n in names.values())
    shapes = profile_step.op_shapes(jax.jit(f).lower(jnp.ones((8, 8))).compile().as_text())
    assert {shapes[c] for c in containers} == {"(f32[8,8]{1,0}) conditional"}
    assert containers and all(names[c].split("/")[-1] in ("cond", "while") for c in containers)


def test_gpu_suite_dry_run_writes_one_results_file_outside_the_repository_naming_each_run_and_its_figures(tmp_path):
    import os

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(GPU_SUITE_DRY="1", STAGES="sample train", TMPDIR=str(tmp_path))
    done = subprocess.run(["bash", "eval/gpu_suite.sh", "300"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (repo / "gpu_results").exists()
    (results,) = [p for p in tmp_path.iterdir() if p.name.startswith("gpu_suite.")]
    assert sorted(p.name for p in results.iterdir()) == ["results.jsonl", "suite.log"]
    lines = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert [line["name"] for line in lines] == ["check_tiny", "sample_flux_tiny", "train_flux_tiny"]
    assert lines[0]["result"]["preset"] == "qwen-image-tiny" and lines[1]["result"]["steps"] == 2
    assert lines[2]["result"]["run"]["median_step_ms"] > 0
    check_elastic_benchmark(lines[0]["result"])
    check_sample_benchmark(lines[1]["result"])


def check_sample_benchmark(result: dict) -> None:
    """The sample benchmark (the GPU suite's stage `sample`, run by the dry run above) times every
    cache and the learned-reuse pattern beside dense, with their FLOP reductions and the routers' cost."""
    cutting = {"forced_pattern", "cache_borderline", "first_block_reusing", "mag_cache", "taylor_seer", "learned_reuse_pattern"}
    assert set(result["ms_per_step"]) == cutting | {"dense", "routers_all_open", "first_block_computing",
                                                    "taylor_seer_computing"}
    assert set(result["speedup_vs_dense"]) == set(result["flop_reduction_vs_dense"]) == cutting
    assert result["flop_reduction_vs_dense"]["forced_pattern"] > 1 and result["step_reuse_rate"]["first_block_reusing"] == 0.5
    assert "step_cache_decision_over_dense" in result and "taylor_factors_over_dense" in result
    assert result["routers_flops_over_dense"] > 0 and "routers_time_over_dense" in result


def test_train_benchmark_reports_one_device_beside_eight(tmp_path):
    from edit_jax.eval import bench_train

    result = bench_train.main(["--preset", "flux-tiny", "--steps", "3", "--skip", "1", "--batch", "8", "--height", "4",
                               "--width", "4", "--txt", "4", "--out", str(tmp_path / "train.json")])
    assert result["one_device"]["devices"] == 1 and result["sharded"]["mesh"] == {"data": 2, "fsdp": 4}
    assert result["step_time_ratio_sharded_over_one"] > 0
    assert json.loads((tmp_path / "train.json").read_text())["preset"] == "flux-tiny"


@pytest.mark.parametrize("vae", [["--size", "32", "--channels", "8,8,16,16"],
                                 ["--size", "64", "--vae", "qwen-image", "--channels", "4", "--tile", "32"]],
                         ids=["flux", "qwen-image-tiled"])
def test_vae_benchmark_reports_both_sides_time_and_peak_memory(vae, tmp_path):
    from edit_jax.eval.bench_vae import main

    result = main(["--runs", "1", *vae, "--out", str(tmp_path / "vae.json")])
    for side in ("ours", "diffusers"):
        assert result[side]["decode_s"] > 0 and result[side]["peak_rss_gib"] > 0
    assert result["ours_vs_diffusers_time"] > 0 and (tmp_path / "vae.json").is_file()
    # each side's peak memory is its own: diffusers' process never loads JAX (nor edit_jax, which imports
    # it), ours never torch
    assert [result["ours"][f"{m}_loaded"] for m in ("jax", "torch")] == [True, False]
    assert [result["diffusers"][f"{m}_loaded"] for m in ("jax", "torch")] == [False, True]


def test_compile_benchmark_times_tracing_lowering_and_compiling_each_mode_without_weights(tmp_path):
    from edit_jax.eval.bench_compile import main

    result = main(["--preset", "qwen-image-tiny", "--height", "2", "--width", "2", "--txt", "4", "--modes", "infer",
                   "train_step", "--out", str(tmp_path / "compile.json")])
    assert set(result["seconds"]) == {"infer", "train_step"}
    for seconds in result["seconds"].values():
        assert seconds["total_s"] >= seconds["compile_s"] > 0 and seconds["trace_s"] > 0
    assert json.loads((tmp_path / "compile.json").read_text())["preset"] == "qwen-image-tiny"


def test_layer_stack_benchmark_times_every_loop_form_and_counts_its_weight_slices():
    from edit_jax.eval.bench_layer_stack import main

    result = main(["--layers", "2", "--dim", "8", "--hidden", "16", "--tokens", "4", "--runs", "2"])
    assert set(result["median_ms"]) == {"scan", "scan_unroll2", "fori_closed", "unrolled_static", "separate_arrays"}
    assert result["weight_slices_in_hlo"]["separate_arrays"] == 0 and result["over_scan"]["scan"] == 1.0


def test_a_bad_benchmark_flag_is_one_line_naming_it_and_exit_status_2():
    done = subprocess.run([sys.executable, "-m", "edit_jax.eval.bench_router", "--set", "nope=1"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("edit_jax.eval.bench_router: error: --set 'nope=1': expected FIELD=VALUE")


def test_a_vae_benchmark_size_off_the_vae_scale_is_refused_before_any_work():
    from edit_jax.eval.bench_vae import main

    with pytest.raises(ValueError, match="--size 33: must be a positive multiple of 8 pixels"):
        main(["--size", "33"])
    with pytest.raises(ValueError, match="--tile 16: give a multiple of 32 px"):
        main(["--size", "64", "--tile", "16"])


def test_volume_benchmark_projects_each_resolution_from_its_chunks_and_checks_one_by_a_whole_decode(tmp_path):
    from edit_jax.eval import bench_volume

    result = bench_volume.main(["--resolutions", "6,12", "--measure", "6", "--num-chunks", "100", "--chunks", "2",
                                "--set", "width=16", "--set", "heads=2", "--set", "num_decoder_layers=1",
                                "--set", "num_latents=8", "--out", str(tmp_path / "volume.json")])
    small, large = result["rows"]
    assert small["chunks"] == 4 and large["chunks"] == 22 and small["measured_s"] > 0
    assert small["chunk_device_bytes"]["temporaries"] == large["chunk_device_bytes"]["temporaries"]  # fixed memory
    assert json.loads((tmp_path / "volume.json").read_text())["num_chunks"] == 100
