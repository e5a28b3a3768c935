"""TFDS sources (`tfds:NAME`): any TensorFlow Datasets image-classification dataset,
its own validation and test splits used when it has them."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from research.config import DataConfig, UserError
from research.data.layout import parse_classes, split_plan
from research.data.splits import AUTOTUNE, Source, _resize_uint8, fingerprint


def load_tfds_source(cfg: DataConfig, size: int) -> Source:
    import tensorflow_datasets as tfds
    name = cfg.source.arg
    try:
        # A name with no builder code but prepared files under data_dir/NAME/VERSION/
        # (a dataset prepared elsewhere) loads from those files: tfds.builder falls back.
        builder = tfds.builder(name, data_dir=cfg.data_dir)
        builder.download_and_prepare()
    except ImportError as e:
        # An installation problem, not a data one (issue 13: importlib_resources).
        raise UserError(f"--dataset=tfds:{name}: TFDS needs the Python module {e.name or str(e)!r}, which is not "
                        f"installed; reinstall this project's dependencies (pip install -e .)") from None
    except tfds.core.registered.DatasetNotFoundError:
        where = f"--data_dir={cfg.data_dir}" if cfg.data_dir else "TFDS's default data_dir"
        raise UserError(f"--dataset=tfds:{name}: no such TFDS dataset, and no prepared copy in {where} "
                        f"(expected {name}/VERSION/dataset_info.json there); check the name in the TFDS "
                        "catalog or pass the --data_dir it was prepared into") from None
    except Exception as e:  # no network, bad data_dir, a failing builder
        raise UserError(f"--dataset=tfds:{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    info = builder.info
    keys = list(info.features.keys()) if hasattr(info.features, "keys") else []
    label_feature = info.features["label"] if "label" in keys else None
    if label_feature is None or not hasattr(label_feature, "names") or "image" not in keys:
        raise UserError(f"tfds:{name} is not an image-classification dataset (needs 'image' and 'label' features)")
    names = list(label_feature.names)
    # An empty split list means TFDS has no metadata to check against (e.g. under
    # tfds.testing.mock_data); as_dataset then reports a bad split name itself.
    splits = list(info.splits.keys())
    if splits and cfg.train_split.split("[")[0] not in splits:
        raise UserError(f"--train_split={cfg.train_split!r} not in tfds:{name}; splits: {', '.join(splits)}")
    for flag, split in (("--val_split", cfg.val_split), ("--test_split", cfg.test_split)):
        if split and splits and split.split("[")[0] not in splits:
            raise UserError(f"{flag}={split!r} not in tfds:{name}; splits: {', '.join(splits)}")
    own_val = cfg.val_split or next((s for s in ("validation", "val") if s in splits), "")
    own_test = cfg.test_split or ("test" if "test" in splits else "")
    val_plan, test_plan, test_from = split_plan(cfg, bool(own_val), bool(own_test), own=f"tfds:{name}")
    if val_plan == test_plan == "own" and own_val == own_test:
        raise UserError(f"tfds:{name}: {own_val!r} would be both the validation and the test split; pass another "
                        "--test_split, or --test=none to validate on it without a test split")
    if val_plan == test_plan == "own" and own_val.split("[")[0] == own_test.split("[")[0] and own_val != own_test:
        raise UserError(f"tfds:{name}: --val_split={own_val!r} and the test split {own_test!r} are slices of the same "
                        "split, which this code cannot check for overlap; name another --test_split, or --test=none")
    # Carved slices are TFDS percent slices of the training split: deterministic and
    # the same for every seed (TFDS shuffled the examples when it prepared them).
    # Validation is the last v %, test the t % before it: turning test on keeps validation.
    v = int(round(100 * cfg.val_fraction)) if val_plan == "carve" else 0
    t = int(round(100 * cfg.test_fraction)) if test_plan == "carve" else 0
    if (val_plan == "carve" and v < 1) or (test_plan == "carve" and t < 1):
        raise UserError(f"tfds:{name}: --val_fraction and --test_fraction carve whole percents of "
                        f"{cfg.train_split!r}; each must be at least 0.01")
    ts = cfg.train_split
    train_split = f"{ts}[:{100 - v - t}%]" if v + t else ts
    val_split = f"{ts}[{100 - v}%:]" if val_plan == "carve" else own_val
    test_split = {"own": own_test, "val": own_val, "carve": f"{ts}[{100 - v - t}%:{100 - v}%]", "none": ""}[test_plan]
    if test_plan == "own":
        test_from = f"tfds:{name} split {own_test!r}"
    elif test_plan == "val":
        test_from = f"tfds:{name} split {own_val!r} (the source's validation split)"
    keep = parse_classes(cfg.classes, names)
    table = np.full(len(names), -1, np.int32)
    table[keep] = np.arange(len(keep), dtype=np.int32)
    table_t = tf.constant(table)

    def count(split: str) -> np.ndarray:
        # Labels only: the images are not decoded.
        ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False,
                                decoders={"image": tfds.decode.SkipDecoding()})
        ds = ds.map(lambda x, y: tf.gather(table_t, tf.cast(y, tf.int32)))
        return ds.filter(lambda y: y >= 0).map(lambda y: tf.one_hot(y, len(keep), dtype=tf.int64)).reduce(
            tf.zeros([len(keep)], tf.int64), lambda a, b: a + b).numpy()

    def size_of(split: str) -> int | None:
        """The split's size from the builder's metadata, without reading it (all classes only)."""
        if len(keep) < len(names):
            return None
        try:
            return int(info.splits[split].num_examples) or None
        except Exception:  # no metadata (mock data), or a slice TFDS cannot size
            return None

    def make(split: str) -> tuple[tf.data.Dataset, int, list[int]]:
        try:
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
        except (ValueError, KeyError, tf.errors.OpError) as e:
            raise UserError(f"tfds:{name} split {split!r}: {str(e).splitlines()[0]}") from None
        ds = ds.map(lambda x, y: (x, tf.gather(table_t, tf.cast(y, tf.int32))))
        if len(keep) < len(names):
            ds = ds.filter(lambda x, y: y >= 0)
        ds = ds.map(lambda x, y: (_resize_uint8(_ensure_rgb(x), size), y), num_parallel_calls=AUTOTUNE)
        n = size_of(split)
        if n is not None:
            return ds, n, []
        counts = count(split)
        return ds, int(counts.sum()), counts.tolist()

    train, n_train, c_train = make(train_split)
    val, n_val, _ = make(val_split)
    test, n_test, _ = make(test_split) if test_split else (None, 0, [])
    version = str(getattr(info, "version", ""))
    return Source(train, val, n_train, n_val, [names[k] for k in keep], size, test=test,
                  num_test=n_test, test_from=test_from, train_counts=c_train,
                  count_classes=lambda: count(train_split),
                  fingerprints={k: fingerprint("tfds", name, version, cfg.data_dir, split, keep)
                                for k, split in (("train", train_split), ("val", val_split), ("test", test_split))})


def _ensure_rgb(x):
    x = tf.convert_to_tensor(x)
    if x.shape.rank == 2:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = tf.image.grayscale_to_rgb(x)
    return x[..., :3]
