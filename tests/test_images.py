"""One decode everywhere (research/data/images.py): EXIF orientation, WebP, giant JPEGs, plain error messages."""

import io
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from research.data import folders, images, sources, splits
from research.config import DataConfig, UserError


def _pattern(h: int = 24, w: int = 40) -> np.ndarray:
    """An image that no flip or rotation maps onto itself."""
    rng = np.random.RandomState(h * w)
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.linspace(0, 255, w)[None, :]
    x[..., 1] = np.linspace(0, 255, h)[:, None]
    x[: h // 3, : w // 4, 2] = 255
    return np.clip(x + rng.randint(0, 20, x.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def _upright_by_pil(raw: bytes) -> np.ndarray:
    """PIL's `exif_transpose` applied to TF's own decode of the stored pixels.

    The reference for where each orientation puts the pixels; decoding with TF
    keeps decoder differences (PIL's IDCT differs by a few levels) out of it.
    """
    stored = Image.fromarray(tf.io.decode_jpeg(raw, channels=3).numpy())
    with Image.open(io.BytesIO(raw)) as original:
        stored.info["exif"] = original.info["exif"]
    return np.asarray(ImageOps.exif_transpose(stored))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_as_pil_applies_it(orientation):
    raw = _jpeg(_pattern(), orientation)
    assert int(images.exif_orientation(tf.constant(raw))) == orientation
    expected = _upright_by_pil(raw)
    assert expected.shape == ((40, 24, 3) if orientation >= 5 else (24, 40, 3))
    np.testing.assert_array_equal(images.decode(tf.constant(raw)).numpy(), expected)


def _insert_exif(raw: bytes, tiff: bytes) -> bytes:
    """`raw` (a JPEG with a JFIF APP0 and no EXIF) with an APP1 Exif segment after its APP0."""
    assert raw[:4] == b"\xff\xd8\xff\xe0"
    cut = 4 + int.from_bytes(raw[4:6], "big")
    payload = b"Exif\0\0" + tiff
    return raw[:cut] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + raw[cut:]


def _big_endian_tiff(orientation: int, ifd_offset: int = 8) -> bytes:
    entry = (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")
    entry += orientation.to_bytes(2, "big") + b"\0\0"
    return b"MM\x00\x2a" + ifd_offset.to_bytes(4, "big") + (1).to_bytes(2, "big") + entry + bytes(4)


def test_exif_after_jfif_in_big_endian_byte_order():
    """PIL writes little-endian EXIF as the first segment; cameras also write "MM" after a JFIF APP0."""
    plain = _jpeg(_pattern())
    raw = _insert_exif(plain, _big_endian_tiff(6))
    with Image.open(io.BytesIO(raw)) as im:
        assert im.getexif()[0x0112] == 6  # a valid tag by PIL's reading too
    assert int(images.exif_orientation(tf.constant(raw))) == 6
    stored = tf.io.decode_jpeg(raw, channels=3).numpy()
    np.testing.assert_array_equal(images.decode(tf.constant(raw)).numpy(), np.rot90(stored, k=-1))  # 90 deg cw


@pytest.mark.parametrize("case", ["no exif", "png", "not an image", "offset past the end", "orientation 9",
                                  "truncated segment"])
def test_missing_or_malformed_orientation_reads_as_upright(case):
    plain = _jpeg(_pattern())
    raw = {
        "no exif": plain,
        "png": _png(_pattern()),
        "not an image": b"hello",
        "offset past the end": _insert_exif(plain, _big_endian_tiff(6, ifd_offset=1 << 20)),
        "orientation 9": _insert_exif(plain, _big_endian_tiff(9)),
        "truncated segment": plain[:20] + b"\xff\xe1\x01\x00Exif\0\0MM\x00",
    }[case]
    assert int(images.exif_orientation(tf.constant(raw))) == 1


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_the_folder_source_feeds_upright_pixels(tmp_path):
    """Training (and evaluate, which loads the same source) sees the photo upright."""
    raws = {}
    for split in ("train", "val"):
        for cls, orientation in (("a", 6), ("b", 3)):
            (tmp_path / split / cls).mkdir(parents=True)
            raws[cls] = _jpeg(_pattern(), orientation)
            (tmp_path / split / cls / "photo.jpg").write_bytes(raws[cls])
    src = sources.load_source(DataConfig(dataset=f"folder:{tmp_path}", batch_size=1), 24)
    fed = [(x.numpy(), int(y)) for x, y in src.train]
    assert [y for _, y in fed] == [0, 1]
    for (x, _), cls in zip(fed, ("a", "b")):
        upright = _upright_by_pil(raws[cls])
        np.testing.assert_array_equal(x, splits._resize_uint8(upright, 24).numpy())
        assert not np.array_equal(x, splits._resize_uint8(tf.io.decode_jpeg(raws[cls]), 24).numpy())


def test_webp_trains_and_other_files_are_named(tmp_path, caplog):
    for cls in ("a", "b"):
        for split in ("train", "val"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(_pattern()).save(tmp_path / split / cls / f"{i}.webp", lossless=True)
    (tmp_path / "train" / "a" / "IMG_0001.HEIC").write_bytes(b"not decodable here")
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        src = sources.load_source(DataConfig(dataset=f"folder:{tmp_path}", batch_size=2), 24)
    assert (src.num_train, src.num_val, src.num_test) == (4, 6, 2)  # one image of each class carved for test
    x = next(iter(src.train))[0].numpy()
    np.testing.assert_array_equal(x, splits._resize_uint8(_pattern(), 24).numpy())  # lossless WebP, exact
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "ignored 1 file(s)" in warned and "IMG_0001.HEIC" in warned and ".heic" in warned
    assert ".DS_Store" not in warned


def test_animated_webp_is_refused_by_name(tmp_path):
    """TF decodes animated WebP only as RGBA: the pre-training check says so instead of failing mid-epoch."""
    frames = [Image.fromarray(_pattern()), Image.fromarray(255 - _pattern())]
    path = tmp_path / "anim.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    with pytest.raises(UserError, match="anim.webp.*animated WebP is not supported.*--skip_bad_images"):
        folders.check_images([str(path)], skip_bad=False)


def test_a_giant_jpeg_is_decoded_at_reduced_scale_and_a_normal_one_exactly():
    side = 4 * 16  # image_size 16: keep the shorter side >= max(MIN_DECODED_SIDE, 64)
    assert images.MIN_DECODED_SIDE > side
    h = 2 * images.MIN_DECODED_SIDE
    y, x = np.mgrid[0:h, 0:h * 4 // 3]
    smooth = np.stack([(x * 255 // x.max()), (y * 255 // y.max()), ((x + y) % 256)], -1).astype(np.uint8)
    giant = _jpeg(smooth)
    got = images.decode(tf.constant(giant), 16)
    assert got.shape == (h // 2, h * 2 // 3, 3)  # decoded at 1/2 scale
    old = images.resize(tf.io.decode_image(giant, channels=3, expand_animations=False), 16).numpy()
    new = images.decode_and_resize(tf.constant(giant), 16).numpy()
    assert np.abs(new - old).mean() < 1.0, np.abs(new - old).mean()

    # One pixel short of the threshold: full scale, bit-identical to the decode before downscaling existed.
    normal = _jpeg(smooth[: h - 1])
    assert images.decode(tf.constant(normal), 16).shape == (h - 1, h * 4 // 3, 3)
    old = images.resize(tf.io.decode_image(normal, channels=3, expand_animations=False), 16).numpy()
    np.testing.assert_array_equal(images.decode_and_resize(tf.constant(normal), 16).numpy(), old)


@pytest.mark.parametrize("raw", [b"not an image at all", _jpeg(_pattern())[:200]], ids=["garbage", "truncated"])
def test_decode_errors_read_without_tensorflow_internals(raw):
    decode = tf.function(lambda r: images.decode_and_resize(r, 16), input_signature=[tf.TensorSpec([], tf.string)])
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        decode(tf.constant(raw))
    assert "{{function_node" in str(e.value)  # what users used to see
    message = images.decode_error(e.value)
    assert message.startswith("not an image TensorFlow can decode (")
    for noise in ("{{", "}}", "[Op:", "[[", "node"):
        assert noise not in message, message


def test_sub_folders_of_a_class_folder_belong_to_it_in_training_conversion_and_prediction(tmp_path, caplog):
    """One rule for a folder of images everywhere (as keras.utils.image_dataset_from_directory
    reads a class folder): training, evaluation (the same source), convert and predict."""
    from research.data import convert
    from research.serve import predict

    root = tmp_path / "data"
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_pattern()).save(root / split / cls / f"{i}.png")
    (root / "train" / "ants" / "more").mkdir()
    for i in range(4):
        Image.fromarray(_pattern()).save(root / "train" / "ants" / "more" / f"extra{i}.png")
    (root / "train" / "ants" / ".thumbs").mkdir()  # hidden: not photos
    Image.fromarray(_pattern()).save(root / "train" / "ants" / ".thumbs" / "t.png")
    (root / "train" / "ants" / "notes.txt").write_text("field notes")
    cfg = DataConfig(dataset=f"folder:{root}", batch_size=2, test="val")
    with caplog.at_level(logging.WARNING):
        src = sources.load_source(cfg, 24)
    # --test=val: val/ is the test split, and validation is carved from the 16 training images.
    assert src.num_train + src.num_val == 6 + 4 + 6 and src.num_test == 6
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "4 image(s) in sub-folders" in warned and "extra0.png" in warned
    assert "ignored 1 file(s)" in warned and "notes.txt" in warned and "t.png" not in warned

    manifest = convert.convert(cfg, str(tmp_path / "shards"), log=lambda *a: None)
    splits_ = manifest["splits"]
    assert splits_["train"]["count"] + splits_["val"]["count"] == 16 and splits_["test"]["count"] == 6
    assert [a + b for a, b in zip(splits_["train"]["class_counts"], splits_["val"]["class_counts"])] == [10, 6]

    found, other = predict.find_images([str(root / "train" / "ants")])
    assert len(found) == 10 and sum("/more/" in f for f in found) == 4
    assert [os.path.basename(f) for f in other] == ["notes.txt"]

    from tests.conftest import run_module
    r = run_module("launch.subset", f"--src={root / 'train'}", f"--out={tmp_path / 'sub'}", "--train_per_class=3",
                   "--test_per_class=3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "sub" / "test" / "ants").iterdir()) == \
        ["more__extra1.png", "more__extra2.png", "more__extra3.png"]
    assert sorted(p.name for p in (tmp_path / "sub" / "train").iterdir()) == ["ants", "bees"]  # no .thumbs class


@pytest.mark.slow  # a run and a predict (~35 s); the default suite keeps the EXIF decode against PIL
def test_a_folder_run_and_predict_write_nothing_to_stderr(tmp_path):
    """No log noise on the everyday path: EXIF-rotated JPEGs (a uint8 transpose made oneDNN log
    an `E0000 … DT_UINT8` line) and a keras.applications backbone (AutoGraph warned it could
    not convert importlib's `_gcd_import` in the map function) on train and predict."""
    import subprocess
    import sys
    from tests.conftest import ROOT

    def run_module(module, *args):  # TF_CPP_MIN_LOG_LEVEL unset: the launchers' default, as a user runs them
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=env)

    root = tmp_path / "photos"
    for c, name in enumerate(("ants", "bees")):
        (root / name).mkdir(parents=True)
        for j in range(8):
            pixels = np.roll(_pattern(40, 56), 7 * j + 20 * c, axis=1)
            (root / name / f"{j}.jpg").write_bytes(_jpeg(pixels, orientation=1 + (j % 8)))
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--dataset=folder:{root}", "--backbone=mobilenet", "--alpha=0.25",
                   "--image_size=32", "--val_fraction=0.25", "--test_fraction=0.25", "--head_epochs=1",
                   "--finetune_epochs=0", "--batch_size=4", f"--workdir={wd}")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    r = run_module("launch.predict", f"--model={wd / 'export'}", str(root / "ants"))
    assert r.returncode == 0 and r.stderr == "", r.stderr[-3000:]
    assert len(r.stdout.strip().splitlines()) == 8
