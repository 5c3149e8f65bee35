"""The benchmark scripts run end to end on tiny configs and report what BENCHMARKS.md records
(timings themselves are never asserted)."""

import json

import pytest

from eval import bench_elastic


@pytest.mark.parametrize("preset", ["flux-tiny", "qwen-image-tiny"])
def test_elastic_benchmark_reports_speedup_beside_flop_reduction(preset, tmp_path, capsys):
    out = tmp_path / "elastic.json"
    result = bench_elastic.main(["--preset", preset, "--height", "4", "--width", "4", "--txt", "8", "--runs", "2",
                                 "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"dense", "forced_pattern", "skips_only", "routers_all_open"} <= set(result["median_ms"])
    assert result["forced"]["flop_reduction"] > 1
    assert result["routers_overhead"]["flops"] > 0


def test_elastic_benchmark_leaves_out_the_comparison_a_pattern_cannot_have(tmp_path):
    # flux-tiny: 1 double + 1 single block; the pattern skips the single one, and a FLUX model
    # needs at least one single block, so there is no dense model without the skipped blocks
    result = bench_elastic.main(["--preset", "flux-tiny", "--height", "4", "--width", "4", "--txt", "8", "--runs", "1"])

    assert "dense_without_skipped_blocks" not in result["median_ms"]
    assert result["skip_mechanism_overhead"] is None
