"""What a second stage starts from: the data order and augmentation of its own global
epoch, and its own learning-rate schedule, as the history records them."""

import math

import pytest

from research.config import AugmentConfig, DataConfig, ExperimentConfig, StageConfig, TrainConfig
from research.run import train as train_lib


def _run(tmp_path, name, stages):
    cfg = ExperimentConfig(data=DataConfig(image_size=16, classes="0-4"),
                           augment=AugmentConfig(horizontal_flip=True),
                           train=TrainConfig(export=False, deterministic=True, steps_per_loop=5),
                           stages=stages)
    return train_lib.train_and_evaluate(cfg, str(tmp_path / name), verbose=False)


def test_a_second_stage_draws_its_first_epoch_with_its_own_global_epoch_seed(tmp_path):
    """Two stages of one epoch each, identical but for their names, train exactly as one
    stage of two epochs: the second stage's epoch is global epoch 1 (its shuffle and its
    flips), not a repeat of epoch 0's."""
    same = dict(unfreeze="all", lr=1e-3, schedule="constant", warmup_epochs=0.0)
    one = _run(tmp_path, "one", (StageConfig(name="a", epochs=2, **same),))
    two = _run(tmp_path, "two", (StageConfig(name="a", epochs=1, **same), StageConfig(name="b", epochs=1, **same)))
    keys = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
    assert [[h[k] for k in keys] for h in two["history"]] == [[h[k] for k in keys] for h in one["history"]]
    assert one["history"][0]["train/loss"] != one["history"][1]["train/loss"]


def _expected_lr(stage: StageConfig, steps_per_epoch: int, s: int) -> float:
    """StageSchedule's rule, written out: linear warmup over `warmup_epochs`, then cosine to
    0 at the stage's end; `s` counts the stage's steps done (the rate of the next step, as
    Keras's own TensorBoard callback logs `optimizer.learning_rate`)."""
    warm = round(stage.warmup_epochs * steps_per_epoch)
    total = stage.epochs * steps_per_epoch
    factor = min(1.0, (s + 1) / warm) if warm else 1.0
    if stage.schedule == "cosine" and s >= warm:
        factor *= 0.5 * (1 + math.cos(math.pi * min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)))
    return stage.lr * factor


def test_the_history_records_each_stage_s_own_schedule(tmp_path):
    stages = (StageConfig(name="head", unfreeze="none", epochs=3, lr=1e-2, warmup_epochs=0.5, schedule="cosine"),
              StageConfig(name="ft", unfreeze="all", epochs=4, lr=1e-3, warmup_epochs=1.5, schedule="cosine"))
    res = _run(tmp_path, "lr", stages)
    history = res["history"]
    spe = history[0]["step"]
    starts = {"head": 0, "ft": history[2]["step"]}
    by_name = {s.name: s for s in stages}
    got = [h["learning_rate"] for h in history]
    expected = [_expected_lr(by_name[h["stage"]], spe, h["step"] - starts[h["stage"]]) for h in history]
    assert got == pytest.approx(expected, rel=1e-6)
    # Not one schedule over the run: the head's cosine ends at 0, the second stage warms up again.
    assert got[2] == 0.0 < got[3] < got[4]
