"""The LR range test: its exponential schedule, fastai's smoothing, the suggestion, divergence."""

import json

import numpy as np
import pytest

from research.studies import lr_find
from tests.conftest import run_module


def test_smoothing_and_the_suggestion_on_a_known_curve():
    # fastai's smoothing, by hand: avg_i = 0.98 avg_{i-1} + 0.02 x_i, divided by 1 - 0.98^(i+1).
    x = [3.0, 1.0, 2.0]
    a1 = 0.02 * 3.0
    a2 = 0.98 * a1 + 0.02 * 1.0
    a3 = 0.98 * a2 + 0.02 * 2.0
    np.testing.assert_allclose(lr_find.smooth(x), [a1 / 0.02, a2 / (1 - 0.98 ** 2), a3 / (1 - 0.98 ** 3)])
    # A loss that falls fastest at lr 1e-3, bottoms out at 1e-1 and then blows up.
    lrs = np.logspace(-6, 0, 121)
    loss = 2.0 - np.tanh(2 * (np.log10(lrs) + 3)) + np.where(lrs > 1e-1, 50 * (np.log10(lrs) + 1) ** 2, 0.0)
    s = lr_find.suggest(lrs, loss)
    assert s["steepest"] == pytest.approx(1e-3, rel=0.15)
    assert s["min_loss_lr"] == pytest.approx(1e-1, rel=0.15) and s["min_lr_over_10"] == pytest.approx(1e-2, rel=0.15)
    # It falls from about 3 (at the first read step) to about 1.0: two thirds of it gone.
    skip = s["skipped_steps"]
    assert s["fall"] == pytest.approx(1 - loss[skip:].min() / loss[skip], rel=1e-9) and s["fall"] > 0.6
    # A loss that stays at ln(10) whatever the rate names no rate.
    flat = lr_find.suggest(lrs, np.log(10) + 0.01 * np.sin(np.arange(121)))
    assert flat["fall"] < lr_find.FLAT


def test_a_range_test_follows_its_schedule_and_stops_when_the_loss_diverges(tmp_path):
    r = run_module("launch.lr_find", f"--out={tmp_path}", "--steps=80", "--start=1e-5", "--end=1e4", "--",
                   "--image_size=16", "--classes=0-4", "--finetune_optimizer=sgd", "--epochs=1")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "lr_find.json").read_text())
    assert res["optimizer"] == "sgd"  # the stage's own, not the run's Adam
    n = res["steps_run"]
    assert 10 <= n < 80, n  # an SGD step at lr 1e4 diverges: the test stops early
    expected = 1e-5 * (1e4 / 1e-5) ** (np.arange(n) / 79)
    np.testing.assert_allclose(res["lrs"], expected, rtol=1e-4)
    assert res["traces"] == 1  # one traced step for the whole sweep
    assert res["lrs"][0] <= res["suggestion"]["steepest"] <= res["lrs"][-1]
    assert (tmp_path / "lr_find.png").stat().st_size > 1000
    assert "suggested lr:" in r.stdout
    # The note says a flat curve names no rate exactly when it is flat.
    assert ("not a rate to trust" in res["note"]) == (res["suggestion"]["fall"] < lr_find.FLAT), res["note"]


def test_bad_ranges_exit_2(tmp_path):
    r = run_module("launch.lr_find", f"--out={tmp_path}", "--start=1", "--end=0.1")
    assert r.returncode == 2 and "need 0 < start < end" in r.stderr and "Traceback" not in r.stderr


def test_the_suggestion_ignores_the_smoothing_warm_up():
    """The first batches' losses scatter; smoothed, they fall steeply over the first steps at
    rates that train nothing. The suggestion is the real descent (1e-2 to 6e-2 here)."""
    rng = np.random.RandomState(0)
    lrs = 1e-7 * (1.0 / 1e-7) ** (np.arange(100) / 99)
    fall = np.clip((np.log(lrs) - np.log(1e-2)) / (np.log(6e-2) - np.log(1e-2)), 0, 1)
    raw = 1.4 - 0.9 * fall + rng.normal(0, 0.15, 100) + np.where(lrs > 0.2, 20 * np.log(lrs / 0.2), 0.0)
    raw[:3] = [1.9, 1.0, 1.1]  # the first batches, as a real run's scatter
    smoothed = lr_find.smooth(list(raw))
    # The trap: over the first steps the smoothed loss falls faster than anywhere later.
    early = np.polyfit(np.log(lrs[:4]), smoothed[:4], 1)[0]
    real = np.polyfit(np.log(lrs[75:85]), smoothed[75:85], 1)[0]
    assert early < real < 0
    s = lr_find.suggest(lrs, smoothed)
    assert 1e-2 <= s["steepest"] <= 1e-1, s
    assert s["skipped_steps"] == 10
