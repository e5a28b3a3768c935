"""The parameter-efficiency study (`launch.ablate --study=peft`): its table and Pareto front."""

import json

import numpy as np
import pytest
import scipy.stats

from research.studies import peft
from tests.conftest import run_module


def _rows(table):
    """{spec: (trainable, [test accuracy per seed])} as the sweep's rows."""
    rows = []
    for spec, (trainable, accs) in table.items():
        for seed, acc in enumerate(accs):
            rows.append({"trial": f"{spec}-{seed}", "unfreeze": spec, "seed": str(seed), "status": "done",
                         "test/accuracy": acc, "trainable_params": trainable, "backbone_trained_params": trainable - 10,
                         "backbone_share": (trainable - 10) / 1000, "seconds_per_epoch": 1.0 + seed,
                         "peak_host_mb": 700.0, "peak_gpu_mb": None})
    return rows


def test_the_summary_pairs_by_seed_against_all_and_marks_the_pareto_front():
    table = {"none": (12, [0.60, 0.62, 0.64]), "norm": (50, [0.70, 0.66, 0.74]), "bias": (40, [0.58, 0.60, 0.62]),
             "lora:4": (300, [0.80, 0.78, 0.85]), "top:1": (400, [0.79, 0.80, 0.78]), "all": (1000, [0.81, 0.80, 0.84])}
    summary = {e["spec"]: e for e in peft.summarize(_rows(table), list(table))}
    assert list(summary) == list(table)
    # Pareto: more accurate than everything with as few parameters. Not bias (more than none, less accurate)
    # nor top:1 (lora:4 beats it with fewer).
    assert {s for s, e in summary.items() if e["pareto"]} == {"none", "norm", "lora:4", "all"}
    ref = np.array(table["all"][1])

    def scipy_interval(x):  # the reference: scipy's t-interval of the mean
        x = np.asarray(x)
        return scipy.stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy.stats.sem(x))

    lo, hi = scipy_interval(ref)
    for spec, (_, accs) in table.items():
        e = summary[spec]
        assert (e["test"].lo, e["test"].hi) == pytest.approx(scipy_interval(accs), abs=1e-12)
        if spec == "all":
            assert e["diff"] is None and e["inside_reference"] is None
        else:
            diff = np.array(accs) - ref  # paired by seed
            assert (e["diff"].mean, e["diff"].lo, e["diff"].hi) == pytest.approx(
                (diff.mean(), *scipy_interval(diff)), abs=1e-12)
            assert e["inside_reference"] == (lo <= np.mean(accs) <= hi)
    assert summary["lora:4"]["inside_reference"] and not summary["bias"]["inside_reference"]
    assert summary["norm"]["seconds_per_epoch"] == 2.0 and summary["norm"]["trained"] == 40


def test_trial_costs_read_the_last_stage_and_the_largest_session(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({
        "stages": [{"name": "head"}, {"name": "ft", "backbone_share": 0.25}],
        "history": [{"stage": "head", "train_seconds": 9.0}, {"stage": "ft", "train_seconds": 5.0},
                    {"stage": "ft", "train_seconds": 1.0}, {"stage": "ft", "train_seconds": 3.0}],
        "provenance": [{"peak_memory_mb": {"host_rss": 800.0}}, {"peak_memory_mb": {"host_rss": 900.0}}]}))
    # The stage's first epoch (tracing) is left out: the median of 1 and 3.
    assert peft.trial_costs(str(tmp_path)) == {"seconds_per_epoch": 2.0, "backbone_share": 0.25,
                                               "peak_host_mb": 900.0, "peak_gpu_mb": None}


@pytest.mark.slow  # 4 trials, ~90 s on 2 cores
def test_the_peft_study_runs_the_specs_and_writes_its_table_and_plot(tmp_path):
    r = run_module("launch.ablate", "--study=peft", f"--root={tmp_path}", "--seeds=0,1", "--specs=norm,lora:4", "--",
                   "--image_size=16", "--classes=0-2", "--head_epochs=1", "--finetune_epochs=2", "--batch_size=64")
    assert r.returncode == 0, r.stderr[-3000:]
    report = (tmp_path / "peft.md").read_text()
    assert "| `norm` | 2 |" in report and "| `lora:4` | 2 |" in report and "| 448 | 0.48% |" in report
    assert (tmp_path / "peft.png").stat().st_size > 1000 and (tmp_path / "results.csv").exists()
