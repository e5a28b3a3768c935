"""The benchmark runs and writes every key (no timing is asserted: these machines are noisy)."""

import json

from tests.conftest import run_module

RATIO_KEYS = ("ratio", "repeats")


def test_bench_quick_tiny_writes_every_key(tmp_path):
    out = tmp_path / "bench.json"
    r = run_module("launch.bench", "--quick", "--tiny", f"--out={out}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads(out.read_text())
    for key in ("loop_vs_fit", "loop_vs_fit_matched"):
        entry = b[key]["small_cnn_32"]
        assert all(k in entry for k in RATIO_KEYS) and "loop" in entry
        assert entry["loop_traces"] == 1  # no retracing across calls and repeats
    assert {"loop", "fit"} <= set(b["loop_vs_fit"]["small_cnn_32"])
    assert {"pipeline", "ceiling", "first_epoch", "no_augment", "without_stream", "without_thread_cap",
            "without_fused_warp", "pipeline_only"} <= set(b["pipeline_vs_ceiling"])
    assert {"cached", "base_every_epoch", "extraction_seconds"} <= set(b["feature_cache_speedup"])
    assert {"steps_per_loop_20", "steps_per_loop_1"} <= set(b["steps_per_loop_speedup"])
    for key in ("pipeline_vs_ceiling", "feature_cache_speedup", "steps_per_loop_speedup"):
        assert all(k in b[key] for k in RATIO_KEYS)
        assert b[key]["ratio"] > 0
    assert {"peak_rss_mb", "growth_epoch2_to_last", "rss_mb_by_epoch"} <= set(b["memory"])


def test_bench_profile_writes_traces_and_op_tables(tmp_path):
    out = tmp_path / "prof"
    r = run_module("launch.bench", "--tiny", f"--profile_dir={out}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    prof = json.loads((out / "profile.json").read_text())
    assert set(prof) == {"steps_per_loop_20", "steps_per_loop_1", "pipeline"}
    for run, table in prof.items():
        assert list((out / run / "plugins" / "profile").glob("*/*.xplane.pb")), run  # TensorBoard's Profile tab
        assert table["total_self_ms"] > 0 and table["top_ops"], run
    assert any("Conv2D" in t["type"] for t in prof["steps_per_loop_1"]["by_type"])
    assert any(op["type"] == "ImageProjectiveTransformV3" for op in prof["pipeline"]["top_ops"]) or \
        any(t["type"] == "ImageProjectiveTransformV3" for t in prof["pipeline"]["by_type"])
