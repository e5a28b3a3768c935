"""Mixup and CutMix: the mixed batch is the convex combination / pasted box for the drawn λ,
targets sum to 1, λ follows Beta(α, α), and soft targets train as `model.fit` trains them.

Bit-exact resume and MirroredStrategy == one device with mixing on are in
`test_resume.py` and `test_bn_adapt.py` (the recipe options together).
"""

import numpy as np
import pytest
import tensorflow as tf

from research.data import mix
from research.config import AugmentConfig

K = 5


def _batch(n=8, side=12, seed=0):
    rng = np.random.RandomState(seed)
    x = tf.constant(rng.uniform(-1, 1, (n, side, side, 3)).astype(np.float32))
    y = tf.constant(rng.randint(0, K, n).astype(np.int32))
    return x, y


def test_mixup_is_the_convex_combination_with_the_mirrored_batch():
    cfg = AugmentConfig(mixup=0.4)
    x, y = _batch()
    for b in range(20):
        seed = tf.constant([3, b], tf.int64)
        d = mix.draw(cfg, seed, 12, 12)
        lam = float(d["lam"])
        mx, my = mix.mix_batch(cfg, x, y, K, seed)
        np.testing.assert_allclose(mx.numpy(), lam * x.numpy() + (1 - lam) * x.numpy()[::-1], rtol=1e-6, atol=1e-6)
        onehot = np.eye(K)[y.numpy()]
        np.testing.assert_allclose(my.numpy(), lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(my.numpy().sum(axis=1), 1.0, rtol=1e-6)
        assert not bool(d["cutmix"])
        # A function of the seed only.
        again = mix.mix_batch(cfg, x, y, K, seed)[0]
        assert np.array_equal(again.numpy(), mx.numpy())


def test_cutmix_pastes_the_drawn_box_and_weighs_targets_by_its_area():
    cfg = AugmentConfig(cutmix=1.0)
    x, y = _batch(side=16)
    areas = []
    for b in range(30):
        seed = tf.constant([5, b], tf.int64)
        d = mix.draw(cfg, seed, 16, 16)
        y0, y1, x0, x1 = (int(v) for v in d["box"].numpy())
        assert 0 <= y0 <= y1 <= 16 and 0 <= x0 <= x1 <= 16
        mx, my = mix.mix_batch(cfg, x, y, K, seed)
        inside = np.zeros((16, 16), bool)
        inside[y0:y1, x0:x1] = True
        expected = np.where(inside[None, :, :, None], x.numpy()[::-1], x.numpy())
        assert np.array_equal(mx.numpy(), expected)
        lam = 1 - inside.mean()
        assert float(d["lam"]) == pytest.approx(lam)
        onehot = np.eye(K)[y.numpy()]
        np.testing.assert_allclose(my.numpy(), lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6, atol=1e-6)
        areas.append(inside.mean())
    assert 0 < np.mean(areas) < 1 and len(set(areas)) > 5


def test_lambda_follows_beta_and_mix_prob_and_the_switch():
    from scipy import stats
    alpha = 0.4
    lams = [float(mix.draw(AugmentConfig(mixup=alpha), tf.constant([1, i], tf.int64), 8, 8)["lam"])
            for i in range(600)]
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 0.01
    never = [float(mix.draw(AugmentConfig(mixup=alpha, mix_prob=0.0), tf.constant([1, i], tf.int64), 8, 8)["lam"])
             for i in range(50)]
    assert never == [1.0] * 50
    half = [float(mix.draw(AugmentConfig(mixup=alpha, mix_prob=0.5), tf.constant([2, i], tf.int64), 8, 8)["lam"])
            for i in range(400)]
    assert 0.4 < np.mean(np.array(half) == 1.0) < 0.6
    both = [bool(mix.draw(AugmentConfig(mixup=1.0, cutmix=1.0), tf.constant([4, i], tf.int64), 8, 8)["cutmix"])
            for i in range(400)]
    assert 0.4 < np.mean(both) < 0.6


def test_soft_targets_train_as_model_fit_trains_them():
    """The loop fed mixed (soft) targets gives fit's weights for the same batches with
    CategoricalCrossentropy (and its label smoothing)."""
    import keras
    from research.model import backbones, unfreeze
    from research.config import StageConfig, TrainConfig
    from research.run.loop import Trainer
    from research.model.optim import StageSchedule, build_optimizer

    cfg = AugmentConfig(mixup=0.4, cutmix=1.0)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (64, 16, 16, 3)).astype(np.float32)
    y = rng.randint(0, K, 64).astype(np.int32)
    batches = [mix.mix_batch(cfg, tf.constant(x[i:i + 16]), tf.constant(y[i:i + 16]), K,
                             tf.constant([9, i], tf.int64)) for i in range(0, 64, 16)]
    mx = np.concatenate([b[0].numpy() for b in batches])
    my = np.concatenate([b[1].numpy() for b in batches])

    def model():
        keras.utils.set_random_seed(1)
        m = backbones.build_classifier(backbones.build_base("small_cnn", image_size=16), K, dropout=0.0)
        sel = unfreeze.select(m, "small_cnn", "all")
        unfreeze.apply_policy(m, "small_cnn", sel)
        return m, sel

    ref, _ = model()
    ref.compile(optimizer=build_optimizer(TrainConfig(), 1e-3), jit_compile=False,
                loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
    history = ref.fit(mx, my, batch_size=16, epochs=1, shuffle=False, verbose=0)

    ours, sel = model()
    schedule = StageSchedule()
    schedule.set_stage(StageConfig(lr=1e-3, epochs=1, schedule="constant"), start_step=0, steps_per_epoch=4)
    optimizer = build_optimizer(TrainConfig(), schedule)
    optimizer.build(sel.variables)
    trainer = Trainer(ours, optimizer, strategy=tf.distribute.get_strategy(), label_smoothing=0.1)
    trainer.set_trainable(sel.variables)
    sums, _ = trainer.train(iter(tf.data.Dataset.from_tensor_slices((mx, my)).batch(16)), 4)
    assert sums["loss_sum"] / sums["count"] == pytest.approx(history.history["loss"][0], rel=1e-4)
    for a, b, v in zip(ref.get_weights(), ours.get_weights(), ref.weights):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=v.path)


def test_the_training_stream_delivers_mixed_soft_targets(tiny_folder):
    from research.data import sources
    from research.config import DataConfig
    from research.data.pipeline import Pipeline

    src = sources.load_source(DataConfig(dataset=f"folder:{tiny_folder}", batch_size=8), 16)
    pipe = Pipeline(src, batch_size=8, preprocess=lambda x: x / 255.0, augment=AugmentConfig(mixup=0.4), seed=0)
    x, y = next(iter(pipe.train_dataset(0)))
    assert y.shape == (8, 3) and y.dtype == tf.float32
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0, rtol=1e-6)
    x2, y2 = next(iter(pipe.train_dataset(0)))  # the same epoch: the same mixing
    assert np.array_equal(x.numpy(), x2.numpy()) and np.array_equal(y.numpy(), y2.numpy())
    vx, vy = next(iter(pipe.val_dataset()))
    assert vy.shape == (8,)  # evaluation keeps class indices
