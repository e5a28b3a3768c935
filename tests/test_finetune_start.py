"""The options for the start of fine-tuning (issue 28), each pinned to a reference:

- the stage schedule, warmup and zero-LR steps included, equals its closed form step by step;
- `base_lr_ratio` equals two optimizers, the base's at lr * ratio, on the same gradients;
- `zero_lr_steps` moves no weight and leaves Adam's moments what Adam accumulates from
  those batches' gradients (the bias-corrected second moment: their weighted mean square);
- a stage's own optimizer (SGD with momentum after the head's Adam) equals Keras's SGD
  on the same gradients, its cosine starting at the stage's first step;
- `continue_schedule` is one warmup + cosine over the stages' planned steps;
- (slow) runs with each resume bit-identically after SIGKILL, two mirrored replicas
  equal one device, and the learning rate a run logs is the closed form's.
"""

import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.config import StageConfig, TrainConfig
from research.model import backbones, unfreeze
from research.model.optim import StageSchedule, build_optimizer
from research.run.loop import Trainer
from tests.conftest import run_module


def _closed_form(stage: StageConfig, steps_per_epoch: int, s: int) -> float:
    """The rate of the stage's step `s` (0-based): 0 for the first `zero_lr_steps`, then a
    linear warmup over `warmup_epochs` and a cosine to 0 over the steps that are left."""
    s -= stage.zero_lr_steps
    if s < 0:
        return 0.0
    warm = round(stage.warmup_epochs * steps_per_epoch)
    total = stage.epochs * steps_per_epoch - stage.zero_lr_steps
    factor = min(1.0, (s + 1) / warm) if warm else 1.0
    if stage.schedule == "cosine" and s >= warm:
        factor *= 0.5 * (1 + math.cos(math.pi * min(max((s - warm) / max(total - warm, 1), 0.0), 1.0)))
    return stage.lr * factor


@pytest.mark.parametrize("warmup,hold,schedule", [(1.5, 0, "cosine"), (0.0, 7, "cosine"), (1.0, 5, "cosine"),
                                                  (0.5, 3, "constant")])
def test_the_schedule_equals_its_closed_form_step_by_step(warmup, hold, schedule):
    spe, start = 10, 37  # a stage that starts after another's 37 steps
    stage = StageConfig(epochs=3, lr=3e-4, warmup_epochs=warmup, zero_lr_steps=hold, schedule=schedule)
    sched = StageSchedule()
    sched.set_stage(stage, start_step=start, steps_per_epoch=spe)
    got = [float(sched(start + s)) for s in range(3 * spe)]
    want = [_closed_form(stage, spe, s) for s in range(3 * spe)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert got[:hold] == [0.0] * hold and got[hold] > 0


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    base = backbones.build_base("small_cnn", image_size=16)
    return backbones.build_classifier(base, 4, dropout=0.0)


def _batches(n, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 1, (8 * n, 16, 16, 3)).astype(np.float32)
    y = rng.randint(0, 4, 8 * n).astype(np.int32)
    return x, y


def _grads(model, variables, x, y):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    return tape.gradient(loss, variables)


def test_base_lr_ratio_equals_two_optimizers_on_the_same_gradients():
    ratio, lr, steps = 0.1, 1e-3, 4
    ours, ref = _model(), _model()
    ref.set_weights(ours.get_weights())
    sel = unfreeze.select(ours, "small_cnn", "all", base_lr_ratio=ratio)
    head = {v.path for v in unfreeze.head_variables(ours)}
    assert set(sel.lr_multipliers) == {v.path for v in sel.variables} - head
    assert set(sel.lr_multipliers.values()) == {ratio}
    unfreeze.apply_policy(ours, "small_cnn", sel)
    sched = StageSchedule()
    sched.set_stage(StageConfig(lr=lr, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=steps)
    opt = build_optimizer(TrainConfig(), sched)
    opt.build(sel.variables)
    trainer = Trainer(ours, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables, sel.lr_multipliers)

    ref_sel = unfreeze.select(ref, "small_cnn", "all")
    unfreeze.apply_policy(ref, "small_cnn", ref_sel)
    ref_head = [v for v in ref_sel.variables if v.path in head]
    ref_base = [v for v in ref_sel.variables if v.path not in head]
    opt_head, opt_base = keras.optimizers.Adam(lr), keras.optimizers.Adam(lr * ratio)
    opt_head.build(ref_head)
    opt_base.build(ref_base)

    start = [v.numpy().copy() for v in sel.variables]
    x, y = _batches(steps)
    trainer.train(iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(8)), steps)
    for i in range(steps):
        g = _grads(ref, ref_base + ref_head, x[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
        opt_base.apply(g[:len(ref_base)], ref_base)
        opt_head.apply(g[len(ref_base):], ref_head)
    for a, b in zip(sel.variables, ref_sel.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)
    assert all(not np.array_equal(a.numpy(), b) for a, b in zip(sel.variables, start))  # every variable moved


def test_zero_lr_steps_move_no_weight_and_leave_adams_moments_of_those_batches():
    hold, lr = 5, 1e-3
    model = _model()
    sel = unfreeze.select(model, "small_cnn", "all")
    unfreeze.apply_policy(model, "small_cnn", sel)
    sched = StageSchedule()
    sched.set_stage(StageConfig(lr=lr, epochs=1, zero_lr_steps=hold, schedule="constant"), start_step=0,
                    steps_per_epoch=hold + 2)
    opt = build_optimizer(TrainConfig(), sched)
    opt.build(sel.variables)
    trainer = Trainer(model, opt, strategy=tf.distribute.get_strategy())
    trainer.set_trainable(sel.variables)
    before = [v.numpy().copy() for v in model.weights]
    x, y = _batches(hold + 1)
    it = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    trainer.train(it, hold)
    assert all(np.array_equal(b, v.numpy()) for b, v in zip(before, model.weights))  # not a bit moved
    assert int(opt.iterations.numpy()) == hold

    # What Adam accumulates from the same batches' gradients (the weights did not move, so
    # each gradient is the batch's at the starting weights).
    b1, b2 = opt.beta_1, opt.beta_2
    grads = [[g.numpy().astype(np.float64) for g in _grads(model, sel.variables, x[8 * i:8 * i + 8],
                                                            y[8 * i:8 * i + 8])] for i in range(hold)]
    for j, v in enumerate(sel.variables):
        gs = [g[j] for g in grads]
        m = sum((1 - b1) * b1 ** (hold - 1 - i) * g for i, g in enumerate(gs))
        s = sum((1 - b2) * b2 ** (hold - 1 - i) * g * g for i, g in enumerate(gs))
        k = opt._get_variable_index(v)
        np.testing.assert_allclose(opt._momentums[k].numpy(), m, rtol=2e-4, atol=1e-9, err_msg=v.path)
        np.testing.assert_allclose(opt._velocities[k].numpy(), s, rtol=2e-4, atol=1e-12, err_msg=v.path)
        # Bias-corrected, the second moment is the (beta_2-weighted) mean of the squared gradients.
        weights = np.array([b2 ** (hold - 1 - i) for i in range(hold)])
        mean_sq = sum(w * g * g for w, g in zip(weights, gs)) / weights.sum()
        np.testing.assert_allclose(opt._velocities[k].numpy() / (1 - b2 ** hold), mean_sq, rtol=2e-4, atol=1e-12)
    trainer.train(it, 1)  # the first real step: at the stage's rate
    assert any(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.weights))
    assert float(sched(hold)) == pytest.approx(lr)


def test_a_stage_optimizer_of_its_own_equals_keras_sgd_after_adam_on_the_same_gradients():
    """The head trains 3 steps with the run's Adam; then every variable trains 4 steps with
    the stage's SGD (momentum 0.9), whose cosine starts at the stage's own first step."""
    lr_head, lr_ft, n_head, n_ft = 3e-3, 1e-2, 3, 4
    ours, ref = _model(), _model()
    ref.set_weights(ours.get_weights())
    sched = StageSchedule()
    sel_head = unfreeze.select(ours, "small_cnn", "none")
    sel_all = unfreeze.select(ours, "small_cnn", "all")
    adam, sgd = build_optimizer(TrainConfig(), sched), build_optimizer(TrainConfig(), sched, name="sgd")
    adam.build(sel_all.variables)
    sgd.build(sel_all.variables)
    assert isinstance(sgd, keras.optimizers.SGD) and sgd.momentum == TrainConfig().momentum == 0.9
    trainer = Trainer(ours, adam, strategy=tf.distribute.get_strategy())
    x, y = _batches(n_head + n_ft)
    it = iter(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    unfreeze.apply_policy(ours, "small_cnn", sel_head)
    sched.set_stage(StageConfig(lr=lr_head, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=n_head)
    trainer.set_trainable(sel_head.variables)
    trainer.train(it, n_head)
    unfreeze.apply_policy(ours, "small_cnn", sel_all)
    sched.set_stage(StageConfig(lr=lr_ft, epochs=1, optimizer="sgd"), start_step=0, steps_per_epoch=n_ft)
    trainer.set_trainable(sel_all.variables, optimizer=sgd)
    trainer.train(it, n_ft)
    assert (int(adam.iterations.numpy()), int(sgd.iterations.numpy())) == (n_head, n_ft)

    ref_head = unfreeze.select(ref, "small_cnn", "none").variables
    ref_all = unfreeze.select(ref, "small_cnn", "all")
    unfreeze.apply_policy(ref, "small_cnn", ref_all)
    ref_adam = keras.optimizers.Adam(lr_head)
    ref_sgd = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(lr_ft, n_ft), momentum=0.9)
    for i in range(n_head + n_ft):
        variables = ref_head if i < n_head else ref_all.variables
        g = _grads(ref, variables, x[8 * i:8 * i + 8], y[8 * i:8 * i + 8])
        (ref_adam if i < n_head else ref_sgd).apply(g, variables)
    for a, b in zip(sel_all.variables, ref_all.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7, err_msg=a.path)


def test_continue_schedule_is_one_schedule_over_the_stages_planned_steps():
    """A head stage with warmup, continued by two stages: the rate at every step of the three
    is the closed form of one stage as long as the three (the continuing stages' own lr,
    schedule and warmup unused); a stage after them restarts."""
    spe = 10
    head = StageConfig(name="head", unfreeze="none", epochs=2, lr=3e-3, warmup_epochs=0.5)
    stages = (head, StageConfig(name="ft", epochs=3, lr=1e-9, schedule="constant", continue_schedule=True),
              StageConfig(name="ft2", epochs=1, lr=1e-9, warmup_epochs=1, continue_schedule=True),
              StageConfig(name="last", epochs=1, lr=5e-4, schedule="constant"))
    one = StageConfig(epochs=6, lr=3e-3, warmup_epochs=0.5)
    sched, got, step = StageSchedule(), [], 0
    for stage in stages:
        sched.set_stage(stage, start_step=step, steps_per_epoch=spe, stages=stages)
        got += [float(sched(step + s)) for s in range(stage.epochs * spe)]
        step += stage.epochs * spe
    want = [_closed_form(one, spe, s) for s in range(60)] + [5e-4] * spe
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)  # float32: about eps * the peak
    # A continuing stage that starts late (its stage before stopped early) starts at its planned place.
    sched.set_stage(stages[1], start_step=7, steps_per_epoch=spe, stages=stages)
    assert float(sched(7)) == pytest.approx(_closed_form(one, spe, 20), rel=1e-6)


def test_a_checkpoints_step_sums_its_optimizers_steps_a_loss_scaled_ones_inner(tmp_path):
    """What `--study=dip` places checkpoints by: 3 steps of the run's loss-scaled Adam (whose
    outer counter stays 0) and 2 of a stage's SGD are the run's step 5."""
    from research.run.checkpoints import saved_step

    v = keras.Variable(np.ones(3, np.float32))
    run_opt = build_optimizer(TrainConfig(), 1e-3, loss_scale=True)
    own = build_optimizer(TrainConfig(), 1e-3, name="sgd")
    for opt, n in ((run_opt, 3), (own, 2)):
        opt.build([v])
        for _ in range(n):
            opt.apply([tf.ones(3)], [v])
    path = tf.train.Checkpoint(optimizer=run_opt, optimizer_sgd=own).save(str(tmp_path / "ckpt"))
    assert saved_step(path) == 5


@pytest.mark.parametrize("args,message", [
    (["--head_epochs=1", "--finetune_optimizer=sgd", "--ema_decay=0.99"], "--ema_decay with an optimizer of its own"),
    (["--continue_schedule"], "continue_schedule needs a stage before it"),
    (["--head_epochs=1", "--finetune_optimizer=sgd", "--continue_schedule"], "another optimizer's (adam, not sgd)"),
    (["--head_epochs=1", "--continue_schedule", "--zero_lr_steps=3"], "zero_lr_steps restarts the schedule"),
    (["--head_epochs=1", "--finetune_optimizer=rmsprop"], "optimizer='rmsprop' is not valid; allowed values: adam"),
    (["--stages=epochs=1; epochs=1 continue_schedule=maybe"], "not a valid bool (1, true, yes, 0, false or no)"),
    (["--head_epochs=1", "--finetune_optimizer=sgd", "--momentum=1.5"], "--momentum=1.5 must be in [0, 1]"),
    (["--head_epochs=1", "--finetune_optimizer=sgd", "--zero_lr_steps=3"], "SGD's momentum stays 0 at that rate"),
    (["--stages=epochs=1; epochs=1 warmup=1 continue_schedule=1"], "so its own warmup would not be used")])
def test_stage_optimizer_and_continue_schedule_refusals(args, message):
    from launch.train import config_from_args
    from research.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        config_from_args(["--image_size=16", *args])


def test_resuming_with_another_stage_optimizer_is_refused_and_another_stage_is_not(tmp_path):
    """Each optimizer is a part of the checkpoint; another stage with the run's optimizer is a
    config change like any other (--allow_config_change)."""
    from launch.train import config_from_args
    from research.errors import UserError
    from research.run.preflight import changes_on_resume
    from tests.test_refusals import _fake_run

    wd = tmp_path / "run"
    base = ["--image_size=16", "--head_epochs=1", "--finetune_epochs=1"]
    _fake_run(wd, config_from_args(base))
    for extra, refused in ((["--finetune_optimizer=sgd"], "stages.1.optimizer: 'adam' -> 'sgd'"),
                           (["--stages=name=head unfreeze=none epochs=1; name=finetune epochs=1; name=more epochs=1 "
                             "optimizer=sgd"], "stage optimizers: [] -> ['sgd']")):
        with pytest.raises(UserError, match=re.escape(refused)):
            changes_on_resume(str(wd), config_from_args([*base, *extra]), allow=True)
    more = config_from_args([*base, "--stages=name=head unfreeze=none epochs=1; name=finetune epochs=1; "
                             "name=more epochs=1 optimizer=adam"])
    assert any(d.startswith("stages.2.name:") for d in changes_on_resume(str(wd), more, allow=True))
    # Naming the run's optimizer is no change: the same optimizer steps the stage.
    assert changes_on_resume(str(wd), config_from_args([*base, "--finetune_optimizer=adam"]), allow=False) == []


def test_a_resume_whose_stages_give_an_optimizer_other_variables_exits_2_and_one_with_the_same_resumes(tmp_path):
    """A stage added with the run's Adam, which so far stepped the head only (the base had
    its own SGD): Adam's slots are checkpointed by position, so no checkpoint could be read.
    A stage whose variables the optimizer already steps changes nothing it holds."""
    from research.errors import UserError
    from research.run.checkpoints import Checkpoints
    from research.run.run_state import RunState

    def checkpoints(model, adam_spec):
        adam = build_optimizer(TrainConfig(), 1e-3)
        sgd = build_optimizer(TrainConfig(), 1e-3, name="sgd")
        adam.build(unfreeze.select(model, "small_cnn", adam_spec).variables)
        sgd.build(unfreeze.select(model, "small_cnn", "all").variables)
        return Checkpoints(str(tmp_path), model=model, base=model.get_layer("small_cnn"), optimizer=adam,
                           stage_optimizers={"sgd": sgd})

    model = _model()
    checkpoints(model, "none").save_latest(RunState())
    with pytest.raises(UserError, match=re.escape("the run's optimizer steps 5 variables, 2 in the checkpoint")):
        checkpoints(_model(1), "all").restore_latest()
    same = _model(1)
    restored = checkpoints(same, "none").restore_latest()
    assert restored is not None and restored[1].endswith("ckpt-1")
    for a, b in zip(same.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_finetune_lr_with_continue_schedule_is_kept_but_said_to_be_unused(caplog):
    from launch.train import config_from_args

    config = config_from_args(["--image_size=16", "--head_epochs=1", "--continue_schedule", "--finetune_lr=1e-4"])
    assert config.stages[1].lr == 1e-4  # a sweep's trial stays the same trial
    assert "--finetune_lr=0.0001 is not used" in caplog.text


def test_the_printed_plan_names_each_stages_optimizer_rate_and_start_of_fine_tuning_options():
    from launch.train import config_from_args

    config = config_from_args(["--image_size=16", "--stages=name=head unfreeze=none epochs=2 lr=3e-3 warmup=1; "
                               "name=ft epochs=4 lr=1e-2 optimizer=adamw zero_lr_steps=5 base_lr_ratio=0.1; "
                               "name=more epochs=1 optimizer=adamw continue_schedule=1; "
                               "name=last epochs=1 optimizer=adamw continue_schedule=1"])
    head, ft, more, last = config.stages
    assert head.describe("adam", head) == "unfreeze none, 2 epoch(s) at lr 0.003 (cosine, warmup 1 epoch(s)), adam"
    assert ft.describe("adam", ft) == ("unfreeze all, 4 epoch(s) at lr 0.01 (cosine), adamw, "
                                       "5 zero-LR step(s) first, the base at lr x 0.1")
    # Both run on ft's schedule, the lead of their span (results.json's stage lr is ft's).
    from research.config.stage import schedule_span
    assert [schedule_span(config.stages, i)[0].name for i in range(4)] == ["head", "ft", "ft", "ft"]
    assert more.describe("adam", ft) == "unfreeze all, 1 epoch(s) continuing stage ft's schedule, adamw"
    assert last.describe("adam", ft) == "unfreeze all, 1 epoch(s) continuing stage ft's schedule, adamw"


def test_each_optimizer_is_built_on_the_variables_of_its_stages_only():
    """The run's Adam holds slots for the head only when fine-tuning has its own SGD; without a
    stage optimizer the run's is built on every stage's variables, as before."""
    from launch.train import config_from_args
    from research.run import build as build_lib

    def built(*args):
        config = config_from_args(["--backbone=small_cnn", "--image_size=16", "--head_epochs=1", *args])
        return build_lib.build(config, 5, tf.distribute.get_strategy())

    own = built("--finetune_optimizer=sgd")
    head = {v.path for v in unfreeze.head_variables(own.model)}
    every = {v.path for v in unfreeze.select(own.model, "small_cnn", "all").variables}
    assert {v.path for v in own.optimizer._trainable_variables} == head
    assert {v.path for v in own.stage_optimizers["sgd"]._trainable_variables} == every
    assert own.optimizer_for(StageConfig(optimizer="sgd")) is own.stage_optimizers["sgd"]
    plain = built()
    assert {v.path for v in plain.optimizer._trainable_variables} == every and not plain.stage_optimizers


def _logged_rates(wd):
    import json
    history = json.loads((wd / "results.json").read_text())["history"]
    return [(h["stage"], h["step"], h["learning_rate"]) for h in history]


# A stage's own SGD after the head's Adam, continued by a third stage: every kind of stage start.
OWN = ["--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32", "--steps_per_loop=5",
       "--checkpoint_keep=10", "--stages=name=head unfreeze=none epochs=1 lr=3e-3; "
       "name=ft unfreeze=all epochs=2 lr=1e-2 optimizer=sgd; name=ft2 unfreeze=all epochs=3 optimizer=sgd "
       "continue_schedule=1"]


@pytest.mark.slow
def test_a_stage_optimizer_and_continue_schedule_resume_after_sigkill_and_match_on_two_replicas(tmp_path):
    from tests.test_distribute_precision import COMMON, _run_and_compare
    from tests.test_resume import assert_killed_run_resumes_bit_identically

    args = [*OWN, "--dropout=0.3", "--horizontal_flip"]
    # Save 5 is ft's end (each epoch saves, and each stage's end once more): killed inside ft2.
    assert_killed_run_resumes_bit_identically(tmp_path / "kill", args, 5)
    ref = tmp_path / "kill" / "ref"
    rates = _logged_rates(ref)
    spe = rates[0][1]  # the head's one epoch
    # Each logged rate is the next step's: the head's cosine restarts at 0 for SGD's own steps,
    # and ft2 goes on with ft's cosine over their 5 epochs.
    ft_sgd = StageConfig(epochs=5, lr=1e-2)
    want = [("head", spe, _closed_form(StageConfig(epochs=1, lr=3e-3), spe, spe))]
    want += [(name, spe * (1 + e), _closed_form(ft_sgd, spe, spe * e)) for name, e in
             (("ft", 1), ("ft", 2), ("ft2", 3), ("ft2", 4), ("ft2", 5))]
    assert [r[:2] for r in rates] == [w[:2] for w in want]
    np.testing.assert_allclose([r[2] for r in rates], [w[2] for w in want], rtol=1e-5, atol=1e-9)
    import json
    recorded = json.loads((ref / "results.json").read_text())["stages"]
    assert [st["lr"] for st in recorded] == [3e-3, 1e-2, 1e-2]  # ft2 runs at ft's rate
    assert [st["optimizer"] for st in recorded] == ["adam", "sgd", "sgd"]
    # The stage's optimizer is part of the checkpoint: another cannot be resumed into it.
    changed = [a.replace("optimizer=sgd", "optimizer=adamw") for a in args]
    r = run_module("launch.train", f"--workdir={ref}", *changed, "--allow_config_change")
    assert r.returncode == 2 and "stages.1.optimizer" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]

    plain = [*COMMON, "--head_epochs=1", "--finetune_optimizer=sgd", "--finetune_lr=1e-2"]
    one = tmp_path / "one"
    r = run_module("launch.train", f"--workdir={one}", "--strategy=default", *plain)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2. finetune: unfreeze all, 1 epoch(s) at lr 0.01 (cosine), sgd" in r.stdout  # the printed plan
    _run_and_compare(one, tmp_path / "two", "--strategy=mirrored", "--cpu_devices=2", *plain)
    cont = [*COMMON, "--head_epochs=1", "--continue_schedule"]
    one = tmp_path / "one_cont"
    r = run_module("launch.train", f"--workdir={one}", "--strategy=default", *cont)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2. finetune: unfreeze all, 1 epoch(s) continuing stage head's schedule, adam" in r.stdout
    _run_and_compare(one, tmp_path / "two_cont", "--strategy=mirrored", "--cpu_devices=2", *cont)


@pytest.mark.slow
def test_a_loss_scaled_stage_optimizer_and_a_second_one_resume_after_sigkill(tmp_path):
    """mixed_float16: the head's Adam and two stage optimizers (SGD, then AdamW), each
    wrapped in its own loss scale, checkpointed and restored beside each other; the run
    ends on its best/ weights (weights only, whatever optimizer trained them)."""
    import json
    from tests.test_resume import assert_killed_run_resumes_bit_identically

    args = ["--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32", "--steps_per_loop=5",
            "--checkpoint_keep=10", "--precision=mixed_float16", "--dropout=0.3", "--restore_best_weights",
            "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=ft unfreeze=top:1 epochs=1 lr=1e-2 optimizer=sgd; "
            "name=ft2 unfreeze=all epochs=2 lr=1e-4 optimizer=adamw"]
    assert_killed_run_resumes_bit_identically(tmp_path, args, 4)  # killed inside ft2
    ref = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert [st["optimizer"] for st in ref["stages"]] == ["adam", "sgd", "adamw"]
    assert all("loss_scale" in h for h in ref["history"])
    assert ref["final"]["val/loss"] == ref["best"]["val/loss"]  # the final scores are best/'s weights'


# Both options on a second stage, with dropout and flips: every source of randomness.
STAGES = ["--deterministic", "--image_size=16", "--classes=0-4", "--batch_size=32", "--steps_per_loop=5",
          "--checkpoint_keep=10", "--stages=name=head unfreeze=none epochs=1 lr=3e-3; "
          "name=ft unfreeze=all epochs=2 lr=1e-3 base_lr_ratio=0.1 zero_lr_steps=7"]


@pytest.mark.slow
def test_a_run_with_both_resumes_after_sigkill_and_two_replicas_match_one_device(tmp_path):
    from tests.test_distribute_precision import COMMON, _run_and_compare
    from tests.test_resume import assert_killed_run_resumes_bit_identically

    args = [*STAGES, "--dropout=0.3", "--horizontal_flip"]
    assert_killed_run_resumes_bit_identically(tmp_path / "kill", args, 3)  # killed inside the ft stage
    # Replicas: one epoch, as tests/test_distribute_precision.py compares them (over more
    # epochs the rounding of replica sums grows past its tolerance with or without these options).
    plain = [*COMMON, "--base_lr_ratio=0.1", "--zero_lr_steps=7"]
    one = tmp_path / "one"
    r = run_module("launch.train", f"--workdir={one}", "--strategy=default", *plain)
    assert r.returncode == 0, r.stderr[-3000:]
    _run_and_compare(one, tmp_path / "two", "--strategy=mirrored", "--cpu_devices=2", *plain)


@pytest.mark.slow
def test_the_dip_study_scores_the_first_fine_tuning_epoch_as_the_run_does(tmp_path):
    """Its curve starts at the head's last validation accuracy and ends, at the epoch's last
    checkpoint, at the run's own first fine-tuning epoch's."""
    import json

    root = tmp_path / "dip"
    r = run_module("launch.ablate", "--study=dip", f"--root={root}", "--seeds=0", "--specs=all",
                   "--recipe=zero:--zero_lr_steps=3", "--recipe=sgd:--finetune_optimizer=sgd", "--",
                   "--dataset=digits", "--backbone=small_cnn",
                   "--image_size=16", "--classes=0-4", "--head_epochs=1", "--finetune_epochs=1",
                   "--checkpoint_every_steps=5", "--deterministic", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("recipe-default__unfreeze-all__seed-0", "recipe-zero__unfreeze-all__seed-0",
                 "recipe-sgd__unfreeze-all__seed-0"):  # its steps are two optimizers
        wd = root / "trials" / name
        dip = json.loads((wd / "dip.json").read_text())
        history = json.loads((wd / "results.json").read_text())["history"]
        head, ft = history[0], history[1]
        assert dip["curve"][0]["step"] == 0  # the head's last checkpoint, scored again
        assert dip["curve"][0]["val/accuracy"] == pytest.approx(head["val/accuracy"], abs=1e-9)
        assert dip["curve"][-1]["step"] == ft["step"] - head["step"] == dip["steps_per_epoch"]
        assert dip["curve"][-1]["val/accuracy"] == pytest.approx(ft["val/accuracy"], abs=1e-9)
        assert dip["curve"][-1]["val/loss"] == pytest.approx(ft["val/loss"], rel=1e-5)
        assert [c["step"] for c in dip["curve"]] == sorted({c["step"] for c in dip["curve"]})
        assert len(dip["curve"]) >= 3
    report = (root / "dip.md").read_text()
    assert "| zero | all | 1 |" in report and (root / "dip.png").exists()
    assert "| val loss, head's last | val loss, highest |" in report


def test_zero_lr_steps_that_take_the_whole_stage_exit_2_before_anything_is_written(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-4", "--finetune_epochs=1",
                   "--zero_lr_steps=100000")
    assert r.returncode == 2 and "zero_lr_steps=100000" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not wd.exists() or not any(wd.iterdir())
