"""The benchmark runs and writes numbers that agree with each other (no timing is asserted:
these machines are noisy)."""

import json
import math
import statistics

import pytest

from tests.conftest import run_module

REPEATS = 3  # odd, so a median is one of the samples and differs from their mean

# Every ratio the bench writes: where it is, and the measurements it divides (numerator, denominator).
RATIOS = {
    ("loop_vs_fit", "small_cnn_32"): ("loop", "fit"),
    ("loop_vs_fit_matched", "small_cnn_32"): ("loop", "fit_matched"),
    ("pipeline_vs_ceiling",): ("pipeline", "ceiling"),
    ("pipeline_vs_ceiling", "first_epoch"): ("pipeline_first_epoch", "ceiling"),
    ("pipeline_vs_ceiling", "no_augment"): ("pipeline_no_augment", "ceiling"),
    ("pipeline_vs_ceiling", "without_stream"): ("pipeline_iterator_per_epoch", "ceiling"),
    ("pipeline_vs_ceiling", "without_thread_cap"): ("pipeline_all_threads", "ceiling"),
    ("pipeline_vs_ceiling", "without_fused_warp"): ("pipeline_keras_layers", "ceiling"),
    ("feature_cache_speedup",): ("cached", "base_every_epoch"),
    ("steps_per_loop_speedup",): ("steps_per_loop_20", "steps_per_loop_1"),
}


def _check_measurement(m, where):
    """images/s samples: as many as the repeats asked, finite and positive; the median is theirs."""
    samples = m["samples"]
    assert len(samples) == REPEATS, (where, samples)
    assert all(math.isfinite(x) and x > 0 for x in samples), (where, samples)
    # Samples are stored rounded to 0.01 images/s; the median is not.
    assert m["median"] == pytest.approx(statistics.median(samples), abs=0.006), (where, m)


@pytest.mark.slow
def test_bench_quick_tiny_writes_consistent_numbers(tmp_path):
    """No timing goal is asserted (these machines are noisy); every number must agree with
    the others it is derived from."""
    out = tmp_path / "bench.json"
    r = run_module("launch.bench", "--quick", "--tiny", f"--repeats={REPEATS}", f"--out={out}", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    b = json.loads(out.read_text())
    assert b["mode"] == "tiny" and b["repeats"] == REPEATS
    for path, (num, den) in RATIOS.items():
        entry = b
        for key in path:
            entry = entry[key]
        where = "/".join(path)
        assert entry["repeats"] == REPEATS, where
        _check_measurement(entry[num], f"{where}/{num}")
        _check_measurement(entry[den], f"{where}/{den}")
        assert entry["ratio"] == pytest.approx(entry[num]["median"] / entry[den]["median"], rel=1e-12), where
    # One measurement shared by several ratios is the same numbers everywhere.
    assert b["loop_vs_fit"]["small_cnn_32"]["loop"] == b["loop_vs_fit_matched"]["small_cnn_32"]["loop"]
    pipe = b["pipeline_vs_ceiling"]
    for sub in ("first_epoch", "no_augment", "without_stream", "without_thread_cap", "without_fused_warp"):
        assert pipe[sub]["ceiling"] == pipe["ceiling"], sub
    for key in ("pipeline_only", "pipeline_only_keras_layers"):
        _check_measurement(pipe[key], key)
    for key in ("loop_vs_fit", "loop_vs_fit_matched"):
        assert b[key]["small_cnn_32"]["loop_traces"] == 1  # no retracing across calls and repeats
    assert pipe["loop_traces"] == 1 and b["steps_per_loop_speedup"]["loop_traces"] == 1
    assert b["feature_cache_speedup"]["extraction_seconds"] > 0

    up = b["startup"]
    _check_measurement(up["import_tensorflow"], "startup/import_tensorflow")
    assert set(up) == {"repeats", "import_tensorflow", "train_first_epoch", "evaluate", "export", "predict"}
    for tool in ("train_first_epoch", "evaluate", "export", "predict"):
        _check_measurement(up[tool]["seconds"], f"startup/{tool}")
        assert up[tool]["ratio"] == pytest.approx(up[tool]["seconds"]["median"] / up["import_tensorflow"]["median"],
                                                  rel=1e-12), tool

    mem = b["memory"]
    assert "error" not in mem, mem
    by_epoch = {int(k): v for k, v in mem["rss_mb_by_epoch"].items()}
    assert sorted(by_epoch) == list(range(1, mem["epochs"] + 1)) and mem["epochs"] == 3
    assert mem["peak_rss_mb"] >= max(by_epoch.values()) > 0
    # The growth is computed from unrounded bytes; the per-epoch values are rounded to 0.1 MB.
    growth = (by_epoch[mem["epochs"]] - by_epoch[2]) / by_epoch[2]
    assert mem["growth_epoch2_to_last"] == pytest.approx(growth, abs=0.11 / by_epoch[2])


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


@pytest.mark.slow
def test_bench_scale_writes_every_mode_and_its_goals(tmp_path):
    out = tmp_path / "scale.json"
    r = run_module("launch.bench", "--scale", "--scale_sizes=300,600", f"--scale_dir={tmp_path / 'data'}",
                   f"--out={out}", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    modes = ("memory", "disk", "none", "tfrecord", "tfrecord_raw")
    for n in ("300", "600"):
        t = res["runs"][n]["throughput"]
        for m in modes:
            _check_measurement({"samples": t[m]["samples"][:REPEATS], "median": statistics.median(
                t[m]["samples"][:REPEATS])}, (n, m))
            run = res["runs"][n][m]
            # Killed after its second epoch's checkpoint, then resumed to its third: both launches trained.
            assert run["first_run"]["returncode"] == -9 and run["resume"]["returncode"] == 0, run
            assert 0 < run["first_run"]["first_step_s"] and 0 < run["resume"]["first_step_s"]
            assert run["first_run"]["peak_rss_mb"] > 100
        for m in modes[1:]:
            assert t["ratios_vs_memory"][m] == pytest.approx(t[m]["median"] / t["memory"]["median"], abs=0.001)
    g = res["goals"]
    assert set(g) >= {"rss_disk_600_vs_300", "rss_tfrecord_600_vs_300", "throughput_tfrecord_vs_memory_600"}
