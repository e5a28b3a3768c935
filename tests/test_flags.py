"""Flags no other test exercises: --checkpoint_every_steps, --histogram_every_epochs,
--clipnorm, --optimizer=adamw.

The launcher runs read what a run leaves on disk (checkpoints through
`tf.train.load_checkpoint`, TensorBoard event files), not results.json or the
checkpoint meta, whose layouts are not part of what is tested here. The maths of
clipping and AdamW is pinned at the library level against `model.fit` with an
optimizer built straight from Keras.
"""

import signal

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.model import backbones, unfreeze
from research.config import DataConfig, StageConfig, TrainConfig
from research.run.loop import Trainer
from research.model.optim import StageSchedule, build_optimizer
from research.data.sources import load_source
from tests.conftest import run_module
from tests.test_loop_matches_fit import _digits, _model
from tests.test_resume import _assert_bit_identical, _start, _wait_for_checkpoint

ITERATIONS = "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE"


def _iterations(path: str) -> int:
    return int(tf.train.load_checkpoint(path).get_tensor(ITERATIONS))


def _all_checkpoints(ckpt_dir) -> list[str]:
    return list(tf.train.get_checkpoint_state(str(ckpt_dir)).all_model_checkpoint_paths)


# --- --checkpoint_every_steps --------------------------------------------------------

# Batch 8 on 2 classes: 36 steps an epoch, so a checkpoint every 10 steps falls
# mid-epoch 3 times an epoch (and at steps 40, 50: counted in global steps, not from the
# epoch start), and the kill below has 26 steps of slack to land mid-epoch.
EVERY = 10
CKPT_ARGS = ["--deterministic", "--image_size=16", "--classes=0-1", "--batch_size=8", "--steps_per_loop=4",
             "--dropout=0.3", "--horizontal_flip", "--rotation=10", "--finetune_epochs=2", "--checkpoint_keep=50",
             f"--checkpoint_every_steps={EVERY}", "--noexport"]


def test_checkpoint_every_steps_saves_at_multiples_and_resumes_bit_identically_mid_epoch(tmp_path):
    """Checkpoints at every multiple of K global steps (plus the epoch ends); a run killed
    after a mid-epoch one resumes from it to the same bits as an uninterrupted run."""
    steps_per_epoch = load_source(DataConfig(classes="0-1", image_size=16, batch_size=8), 16).num_train // 8
    total = 2 * steps_per_epoch
    assert steps_per_epoch % EVERY != 0 and steps_per_epoch > 2 * EVERY

    ref = tmp_path / "ref"
    r = run_module("launch.train", f"--workdir={ref}", *CKPT_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = [_iterations(p) for p in _all_checkpoints(ref / "ckpt")]
    # Every multiple of EVERY, and every epoch end; nothing else.
    expected = set(range(EVERY, total + 1, EVERY)) | {steps_per_epoch, total}
    assert set(saved) == expected, sorted(saved)
    assert saved == sorted(saved) and saved[-1] == total

    wd = tmp_path / "killed"
    proc = _start(wd, CKPT_ARGS)
    _wait_for_checkpoint(wd, 1, proc)  # the first save: step 10, mid-epoch 1
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (wd / "results.json").exists(), "the run finished before it could be killed"
    at = _iterations(tf.train.latest_checkpoint(str(wd / "ckpt")))
    assert at % steps_per_epoch != 0 and at < total, f"killed at step {at}: not after a mid-epoch checkpoint"

    r = run_module("launch.train", f"--workdir={wd}", *CKPT_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_bit_identical(ref / "ckpt", wd / "ckpt")
    assert _iterations(tf.train.latest_checkpoint(str(wd / "ckpt"))) == total


# --- --histogram_every_epochs -------------------------------------------------------

def _events(logdir):
    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return acc


def _histogram_tags(acc) -> set:
    try:
        return set(acc.PluginTagToContent("histograms"))
    except KeyError:  # no histogram in these event files at all
        return set()


def test_histogram_every_epochs_writes_histograms_at_exactly_those_epochs(tmp_path):
    """Two stages of 2 + 3 epochs, histograms every 2 epochs of the run and at its last
    (the cadence rule, `itstime`): after global epochs 2 (the head stage's last: its 2
    variables), 4 and 5 (fine-tuning: every trainable variable), none after 1 or 3."""
    wd = tmp_path / "hist"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-2", "--noexport",
                   "--histogram_every_epochs=2",
                   "--stages=name=head unfreeze=none epochs=2 lr=3e-3; name=ft unfreeze=all epochs=3 lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    train = _events(wd / "train")
    epoch_ends = [e.step for e in train.Tensors("loss")]  # one train/loss per epoch
    assert len(epoch_ends) == 5 and epoch_ends == sorted(set(epoch_ends))
    hist_tags = _histogram_tags(train)
    by_step: dict[int, set] = {}
    for tag in hist_tags:
        for e in train.Tensors(tag):
            by_step.setdefault(e.step, set()).add(tag)
    model = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), 3)
    head = {v.path for v in unfreeze.head_variables(model)}
    every = set(unfreeze.select(model, "small_cnn", "all").paths)
    assert head == {"head/kernel", "head/bias"} and len(every) > len(head)
    assert by_step == {epoch_ends[1]: head, epoch_ends[3]: every, epoch_ends[4]: every}, \
        {s: sorted(t) for s, t in by_step.items()}
    for tag in hist_tags:  # real histograms of the weights: buckets holding every element
        t = tf.make_ndarray(train.Tensors(tag)[-1].tensor_proto)
        assert t.ndim == 2 and t.shape[1] == 3 and t[:, 2].sum() > 0, tag
    assert not _histogram_tags(_events(wd / "val"))


# --- --clipnorm and --optimizer=adamw: the loop equals model.fit with Keras's own optimizer ---

def _loop_and_fit(ours_opt, ref_opt, *, lr, steps=8):
    """Trains the same model for `steps` batches of 32 with our loop (optimizer from
    `build_optimizer`) and with `model.fit` (`ref_opt`); returns (ours, ref, initial) weights."""
    x, y = _digits()
    ref, _ = _model(False)
    ours, sel = _model(False)
    initial = ref.get_weights()
    ours.set_weights(initial)
    ref.compile(optimizer=ref_opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False)
    ref.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0, steps_per_epoch=steps)

    schedule = StageSchedule()
    schedule.set_stage(StageConfig(lr=lr, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=steps)
    optimizer = ours_opt(schedule)
    optimizer.build(sel.variables)
    trainer = Trainer(ours, optimizer, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    sums, bad = trainer.train(iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)), steps)
    assert bad == -1 and int(optimizer.iterations) == steps
    return ours.get_weights(), ref.get_weights(), initial, sums


def _assert_same(a_weights, b_weights, what):
    for i, (a, b) in enumerate(zip(a_weights, b_weights)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"{what}: weight {i}")


def _max_diff(a_weights, b_weights):
    return max(float(np.abs(a - b).max()) for a, b in zip(a_weights, b_weights))


@pytest.mark.parametrize("loss_scale", [False, True], ids=["plain", "loss_scale"])
def test_clipnorm_equals_keras_global_clipnorm(loss_scale):
    """--clipnorm is a global-norm clip (`global_clipnorm`, not Keras's per-variable
    `clipnorm`), on the inner optimizer under loss scaling, so it clips the unscaled
    gradients. SGD with momentum: the update is proportional to the clipped gradient."""
    clip, lr = 0.05, 0.05
    cfg = TrainConfig(optimizer="sgd", momentum=0.9, clipnorm=clip)
    ours, ref, initial, sums = _loop_and_fit(lambda s: build_optimizer(cfg, s, loss_scale=loss_scale),
                                             keras.optimizers.SGD(lr, momentum=0.9, global_clipnorm=clip), lr=lr)
    # Clipping binds: the unclipped gradient norm is far above the clip, and the
    # unclipped run ends far from the clipped one.
    assert sums["grad_norm"] / sums["steps"] > 4 * clip, sums  # mean global gradient norm
    _, unclipped, _, _ = _loop_and_fit(lambda s: build_optimizer(TrainConfig(optimizer="sgd"), s),
                                       keras.optimizers.SGD(lr, momentum=0.9), lr=lr)
    _, per_variable, _, _ = _loop_and_fit(lambda s: build_optimizer(TrainConfig(optimizer="sgd"), s),
                                          keras.optimizers.SGD(lr, momentum=0.9, clipnorm=clip), lr=lr)
    assert _max_diff(ref, unclipped) > 1e-3 and _max_diff(ref, per_variable) > 1e-3
    assert _max_diff(ours, initial) > 1e-3
    _assert_same(ours, ref, f"clipnorm loss_scale={loss_scale}")


def test_adamw_equals_keras_adamw():
    """--optimizer=adamw with --weight_decay: the loop equals model.fit with Keras's AdamW,
    and the decay is visible (the weights differ from plain Adam's)."""
    lr, wd = 1e-2, 0.2
    cfg = TrainConfig(optimizer="adamw", weight_decay=wd)
    ours, ref, initial, _ = _loop_and_fit(lambda s: build_optimizer(cfg, s),
                                          keras.optimizers.AdamW(lr, weight_decay=wd), lr=lr)
    _, adam, _, _ = _loop_and_fit(lambda s: build_optimizer(TrainConfig(optimizer="adam"), s),
                                  keras.optimizers.Adam(lr), lr=lr)
    assert _max_diff(ref, adam) > 1e-4 and _max_diff(ours, initial) > 1e-3
    _assert_same(ours, ref, "adamw")


def test_the_four_flags_reach_the_config_and_the_optimizer():
    """The launcher wiring the tests above take for granted: each flag lands in its
    config field, and `build_optimizer` turns them into Keras's AdamW with that weight
    decay and a global-norm clip (parsed in-process: nothing runs)."""
    from launch import train as launch_train
    t = launch_train.config_from_args(["--optimizer=adamw", "--weight_decay=0.03", "--clipnorm=0.7",
                                       "--checkpoint_every_steps=7", "--histogram_every_epochs=3"]).train
    assert (t.optimizer, t.weight_decay, t.clipnorm, t.checkpoint_every_steps, t.histogram_every_epochs) == \
        ("adamw", 0.03, 0.7, 7, 3)
    opt = build_optimizer(t, 1e-3)
    assert type(opt) is keras.optimizers.AdamW
    assert opt.weight_decay == pytest.approx(0.03) and opt.global_clipnorm == pytest.approx(0.7)
    assert opt.clipnorm is None
