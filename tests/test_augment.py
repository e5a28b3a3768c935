"""The fused augmentation warp against Keras's own RandomRotation/Translation/Zoom layers."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from research.data import augment
from research.config import AugmentConfig

H, W = 24, 32  # not square, so a swapped axis shows


def _params(n=2, *, flip=False, degrees=0.0, shift=(0.0, 0.0), zoom=1.0):
    return {"flip": tf.fill([n], flip), "angle": tf.fill([n], degrees * math.pi / 180.0),
            "shift": tf.tile(tf.constant([shift], tf.float32), [n, 1]), "zoom": tf.fill([n], float(zoom))}


def _warp(x, p):
    return keras.ops.image.affine_transform(x, augment.affine_matrices(p, H, W), interpolation="bilinear",
                                            fill_mode="nearest").numpy()


def _images(n=2):
    return tf.constant(np.random.RandomState(0).uniform(0, 255, (n, H, W, 3)).astype("float32"))


def _ramp(n=2):
    """An image linear in (row, column): bilinear resampling is exact on it, so warps chained
    one after another and one fused warp must agree wherever no border is sampled."""
    r, c = np.meshgrid(np.arange(H, dtype="float32"), np.arange(W, dtype="float32"), indexing="ij")
    img = np.stack([3 * r + 2 * c, 5 * r - c + 100, r + c], axis=-1)
    return tf.constant(np.repeat(img[None], n, axis=0))


def test_flip_is_a_left_right_mirror():
    x = _images()
    np.testing.assert_allclose(_warp(x, _params(flip=True)), x.numpy()[:, :, ::-1], atol=1e-3)
    np.testing.assert_allclose(_warp(x, _params()), x.numpy(), atol=1e-3)


@pytest.mark.parametrize("layer, params", [
    (lambda: keras.layers.RandomRotation((15 / 360, 15 / 360), fill_mode="nearest"), dict(degrees=15)),
    (lambda: keras.layers.RandomRotation((-40 / 360, -40 / 360), fill_mode="nearest"), dict(degrees=-40)),
    (lambda: keras.layers.RandomZoom((0.2, 0.2), fill_mode="nearest"), dict(zoom=1.2)),
    (lambda: keras.layers.RandomZoom((-0.3, -0.3), fill_mode="nearest"), dict(zoom=0.7)),
    (lambda: keras.layers.RandomTranslation((0.25, 0.25), (-0.125, -0.125), fill_mode="nearest"),
     dict(shift=(-0.125, 0.25))),
], ids=["rotate+15", "rotate-40", "zoom_out", "zoom_in", "shift"])
def test_each_warp_matches_the_keras_layer(layer, params):
    x = _images()
    np.testing.assert_allclose(_warp(x, _params(**params)), layer()(x, training=True).numpy(), atol=0.05)


def test_fused_warp_equals_the_keras_layers_chained():
    x = _ramp()
    chained = tf.reverse(x, axis=[2])
    for layer in (keras.layers.RandomRotation((12 / 360, 12 / 360), fill_mode="nearest"),
                  keras.layers.RandomTranslation((0.05, 0.05), (-0.05, -0.05), fill_mode="nearest"),
                  keras.layers.RandomZoom((-0.2, -0.2), fill_mode="nearest")):
        chained = layer(chained, training=True)
    fused = _warp(x, _params(flip=True, degrees=12, shift=(-0.05, 0.05), zoom=0.8))
    inner = (slice(None), slice(5, H - 5), slice(5, W - 5))
    np.testing.assert_allclose(fused[inner], chained.numpy()[inner], atol=1e-2)


def test_parameters_stay_in_range_and_depend_only_on_the_seed():
    aug = augment.build(AugmentConfig(horizontal_flip=True, rotation=10, width_shift=0.1, zoom=0.2, contrast=0.3))
    p = aug.sample(4000, tf.constant([7, 3]))
    deg = np.degrees(p["angle"].numpy())
    assert -10 <= deg.min() < -9.9 and 9.9 < deg.max() <= 10
    assert 0.8 <= p["zoom"].numpy().min() < 0.81 and 1.19 < p["zoom"].numpy().max() <= 1.2
    assert np.abs(p["shift"].numpy()[:, 0]).max() <= 0.1 and not p["shift"].numpy()[:, 1].any()
    assert 0.45 < p["flip"].numpy().mean() < 0.55
    assert 0.7 <= p["contrast"].numpy().min() and p["contrast"].numpy().max() <= 1.3
    again = aug.sample(4000, tf.constant([7, 3]))
    assert all(np.array_equal(p[k].numpy(), again[k].numpy()) for k in p)
    assert not np.array_equal(p["angle"].numpy(), aug.sample(4000, tf.constant([7, 4]))["angle"].numpy())


@pytest.mark.parametrize("cfg", [AugmentConfig(horizontal_flip=True, rotation=20, zoom=0.2, contrast=0.2),
                                 AugmentConfig(crop_scale="0.08,1", vertical_flip=True, horizontal_flip=True,
                                               brightness=0.2, saturation=0.3, hue=0.1, erase_prob=0.5),
                                 AugmentConfig(horizontal_flip=True, randaugment=2, randaugment_magnitude=0.7)],
                         ids=["warps", "crops-colour-erasing", "randaugment"])
def test_parallel_map_gives_the_same_images_as_a_sequential_one(cfg):
    aug = augment.build(cfg)
    ds = tf.data.Dataset.from_tensor_slices(_images(64)).batch(8).enumerate()

    def run(calls):
        out = ds.map(lambda i, x: aug(x, tf.stack([tf.constant(5, tf.int64), i])), num_parallel_calls=calls)
        return np.concatenate([b.numpy() for b in out])

    seq = run(None)
    assert np.array_equal(seq, run(tf.data.AUTOTUNE))
    assert seq.min() >= 0 and seq.max() <= 255
    assert not np.array_equal(seq, _images(64).numpy())


def test_contrast_keeps_each_image_mean_and_scales_its_spread():
    aug = augment.build(AugmentConfig(contrast=0.5))
    x = tf.constant(np.random.RandomState(1).uniform(60, 190, (8, H, W, 3)).astype("float32"))
    seed = tf.constant([2, 9])
    f = aug.sample(8, seed)["contrast"].numpy()
    y = aug(x, seed).numpy()
    mean = x.numpy().mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(np.clip((x.numpy() - mean) * f[:, None, None, None] + mean, 0, 255), y, atol=1e-3)
    assert not np.allclose(f, 1.0)


def test_random_resized_crop_boxes_stay_in_their_ranges():
    scale, ratio = (0.08, 1.0), (0.75, 4 / 3)
    boxes = augment.crop_box(4000, tf.random.experimental.stateless_split(tf.constant([3, 4], tf.int64), 3),
                             scale, ratio, H, W).numpy()
    x0, y0, w, h = boxes.T
    assert (x0 >= -1e-4).all() and (y0 >= -1e-4).all() and (x0 + w <= W + 1e-3).all() and (y0 + h <= H + 1e-3).all()
    area, r = w * h / (H * W), w / h
    fitted = ~np.isclose(area, 1.0)  # a fallback box is the whole image here (its ratio 4/3 is in range)
    assert fitted.mean() > 0.9
    assert (area[fitted] >= scale[0] - 1e-5).all() and (area[fitted] <= scale[1] + 1e-5).all()
    assert (r >= ratio[0] - 1e-4).all() and (r <= ratio[1] + 1e-4).all()
    assert np.log(r[fitted]).std() > 0.05 and area[fitted].std() > 0.1  # really drawn, not fixed
    # No box of 90 % of the area at ratio 3-4 fits: the centred fallback, ratio clamped to 3.
    x0, y0, w, h = augment.crop_box(5, tf.random.experimental.stateless_split(tf.constant([1, 1], tf.int64), 3),
                                    (0.9, 1.0), (3.0, 4.0), H, W).numpy().T
    assert np.allclose(w, W) and np.allclose(h, W / 3.0) and np.allclose(y0, (H - W / 3.0) / 2) and np.allclose(x0, 0)


def test_random_resized_crop_samples_the_box_bilinearly():
    """The warp against scipy's bilinear sampling of the drawn box (pixel centres mapped
    into the box, borders clamped)."""
    from scipy import ndimage

    aug = augment.build(AugmentConfig(crop_scale="0.2,1"))
    x = _images(4)
    seed = tf.constant([5, 6], tf.int64)
    out = aug(x, seed).numpy()
    boxes = aug.sample(4, seed, H, W)["crop"].numpy()
    rows, cols = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    for i, (x0, y0, w, h) in enumerate(boxes):
        yi = y0 + (rows + 0.5) * h / H - 0.5
        xi = x0 + (cols + 0.5) * w / W - 0.5
        for c in range(3):
            ref = ndimage.map_coordinates(x.numpy()[i, :, :, c], [yi, xi], order=1, mode="nearest")
            np.testing.assert_allclose(out[i, :, :, c], ref, atol=1e-2, err_msg=f"image {i}")


def test_vertical_flip_alone_and_inside_the_warp():
    x = _images(16)
    seed = tf.constant([2, 3], tf.int64)
    plain = augment.build(AugmentConfig(vertical_flip=True))
    flips = plain.sample(16, seed)["vflip"].numpy()
    assert 0 < flips.sum() < 16
    out = plain(x, seed).numpy()
    expected = np.where(flips[:, None, None, None], x.numpy()[:, ::-1], x.numpy())
    assert np.array_equal(out, expected)
    # Through the fused warp (with an identity crop), the same flips.
    warped = augment.build(AugmentConfig(vertical_flip=True, crop_scale="1,1", crop_ratio=f"{W / H},{W / H}"))
    np.testing.assert_allclose(warped(x, seed).numpy(), expected, atol=1e-3)


def test_colour_jitter_equals_tf_image_with_the_drawn_factors():
    """Keras's colour layers fed the stateless draws: brightness adds, saturation multiplies,
    hue rotates, as tf.image.adjust_saturation / adjust_hue do per image."""
    x = _images(6)
    seed = tf.constant([8, 9], tf.int64)
    for cfg, key in ((AugmentConfig(brightness=0.2), "brightness"), (AugmentConfig(saturation=0.6), "saturation"),
                     (AugmentConfig(hue=0.2), "hue")):
        aug = augment.build(cfg)
        p = aug.sample(6, seed, H, W)
        out = aug(x, seed).numpy()
        f = p[key].numpy()
        if key == "brightness":
            assert (np.abs(f) <= 0.2 * 255 + 1e-3).all() and f.std() > 1
            ref = np.clip(x.numpy() + f[:, None, None, None], 0, 255)
        elif key == "saturation":
            assert ((f >= 0.4) & (f <= 1.6)).all() and f.std() > 0.05
            ref = np.stack([tf.image.adjust_saturation(x[i] / 255.0, f[i]).numpy() * 255.0 for i in range(6)])
        else:
            assert (np.abs(f) <= 0.2).all() and f.std() > 0.01
            ref = np.stack([tf.image.adjust_hue(x[i] / 255.0, f[i]).numpy() * 255.0 for i in range(6)])
        np.testing.assert_allclose(out, ref, atol=0.5, err_msg=key)


def test_random_erasing_fills_a_box_of_the_allowed_size_with_noise():
    n = 400
    aug = augment.build(AugmentConfig(erase_prob=0.5))
    x = _images(n)
    seed = tf.constant([4, 2], tf.int64)
    boxes = aug.sample(n, seed, H, W)["erase"].numpy()
    out = aug(x, seed).numpy()
    erased = (boxes[:, 1] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 2])
    assert 0.4 < erased.mean() < 0.6
    for i in np.flatnonzero(erased)[:50]:
        y0, y1, x0, x1 = boxes[i]
        h, w = y1 - y0, x1 - x0
        assert 0 <= y0 and y1 <= H and 0 <= x0 and x1 <= W
        assert 0.02 * H * W - H - W <= h * w <= 0.33 * H * W + H + W  # sides are rounded
        inside = np.zeros((H, W), bool)
        inside[y0:y1, x0:x1] = True
        assert np.array_equal(out[i][~inside], x.numpy()[i][~inside])
        assert not np.allclose(out[i][inside], x.numpy()[i][inside])
    for i in np.flatnonzero(~erased)[:20]:
        assert np.array_equal(out[i], x.numpy()[i])


def test_randaugment_applies_keras_operations_chosen_per_image():
    """Each image gets the Keras RandAugment operation it drew, and its result depends on
    that image alone; an operation's output is Keras's own `RandAugment.transform_images`."""
    ra = augment.RandAugment(num_ops=1, magnitude=0.6)
    images = _images(24)
    seed = tf.constant([3, 4], tf.int64)
    out = ra(images, seed).numpy()
    idx, key = ra.choices(24, seed)
    idx = idx[0].numpy()
    assert len(set(idx)) > 4  # images draw different operations
    for j in set(idx):
        chosen = np.flatnonzero(idx == j)
        alone = ra.operation(j, tf.gather(images, chosen), tf.random.experimental.stateless_fold_in(key, j))
        np.testing.assert_allclose(out[chosen], alone.numpy(), atol=1e-4, err_msg=type(ra.ops[j]).__name__)
    # Other images' pixels do not matter (Equalization included): change them all but image k.
    for k in range(24):
        other = tf.where(tf.range(24)[:, None, None, None] == k, images, 255.0 - images)
        np.testing.assert_allclose(ra(other, seed).numpy()[k], out[k], atol=1e-4)
    assert not np.array_equal(out, ra(images, tf.constant([3, 5], tf.int64)).numpy())

    two = augment.RandAugment(num_ops=2, magnitude=0.6)
    for j in (0, 4, 9):  # shear, colour degeneration, auto-contrast: ours against the Keras layer's own
        s = tf.constant([7, j], tf.int64)
        transforms = {name: op.get_random_transformation(images, training=True, seed=augment._Seeds(s))
                      for name, op in zip(two.layer._AUGMENT_LAYERS, two.ops)}
        keras_own = two.layer.transform_images(images, {"transforms": transforms,
                                                        "layer_idxes": tf.constant([j, j])})
        twice = two.operation(j, two.operation(j, images, s), s)
        np.testing.assert_allclose(twice.numpy(), keras_own.numpy(), atol=1e-3)
    assert isinstance(ra.ops[10], keras.layers.Equalization)


def test_randaugment_and_the_eval_crop_run_in_float32_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        aug = augment.build(AugmentConfig(randaugment=2, horizontal_flip=True))
        out = aug(_images(8), tf.constant([1, 2], tf.int64))
        view = augment.eval_view(H, 0.75)(_images(2))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert out.dtype == tf.float32 and view.dtype == tf.float32 and view.shape == (2, H, H, 3)
