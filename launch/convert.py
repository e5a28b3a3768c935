"""Writes a class-folder dataset as TFRecord shards (research/data/convert.py):

    python -m launch.convert --dataset=folder:/data/food-101 --out=/data/food-101-shards [--image_size=256]
    python -m launch.convert ... --image_size=224 --encoding=raw   # pixels: no JPEG decoding while training
    python -m launch.train --workdir=/tmp/run --dataset=tfrecord:/data/food-101-shards ...

Exit status 2, with nothing written, for a bad flag, a non-empty --out or a
corrupt image (named; --skip_bad_images leaves it out and lists it in the manifest).
"""

from __future__ import annotations

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_string("dataset", None, "folder:PATH, a folder of class folders (with train/ and val/ or test/ "
                    "sub-folders, or not; split as launch.train splits it).")
flags.DEFINE_string("out", None, "Where to write the shards and manifest.json (must not exist, or be empty).")
flags.DEFINE_integer("image_size", 0, "Resize every image to this side and re-encode it as JPEG (0: keep each "
                     "file's own bytes; decoding then gives exactly the folder's images).")
flags.DEFINE_enum("encoding", "jpeg", ["jpeg", "raw"], "With --image_size: re-encode as JPEG, or keep the resized "
                  "pixels (raw: nothing to decode while training, about 5x the disk of a JPEG).")
flags.DEFINE_float("shard_mb", 128, "Approximate size of each shard in MB.")
flags.DEFINE_float("val_fraction", 0.2, "Validation fraction carved when the folder has no val/ folder.")
flags.DEFINE_enum("test", "auto", ["auto", "val", "none"], "The test split, as launch.train's --test.")
flags.DEFINE_float("test_fraction", 0.1, "Test fraction carved when the folder has no test/ folder.")
flags.DEFINE_bool("skip_bad_images", False, "Leave out unreadable images (listed in manifest.json) instead of failing.")


def main(argv):
    if len(argv) > 1:
        common.die(f"unexpected arguments: {' '.join(argv[1:])}", common.EXIT_USER_ERROR)
    if not F.dataset or not F.out:
        common.die("--dataset=folder:PATH and --out=DIR are required", common.EXIT_USER_ERROR)
    from research.config import DataConfig, UserError, validate, ExperimentConfig
    cfg = DataConfig(dataset=F.dataset, val_fraction=F.val_fraction, test=F.test, test_fraction=F.test_fraction,
                     skip_bad_images=F.skip_bad_images)
    cfg = validate(ExperimentConfig(data=cfg)).data
    if cfg.source.kind != "folder":
        raise UserError(f"--dataset={F.dataset}: launch.convert reads a folder:PATH dataset")
    from research.data import layout  # every refusal that needs no pixel, before TensorFlow starts
    layout.check_conversion(cfg, F.out, image_size=F.image_size, encoding=F.encoding, shard_mb=F.shard_mb)
    common.start_tensorflow_quietly()
    from research.data import convert
    convert.convert(cfg, F.out, image_size=F.image_size, encoding=F.encoding, shard_mb=F.shard_mb)


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
