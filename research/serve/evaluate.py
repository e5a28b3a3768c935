"""Evaluating a finished run on any split or dataset: metrics, confusion matrix, figure.

`evaluate_run(workdir, ...)` writes `eval/<name>.json` (loss, accuracy, top-5
accuracy with more than 5 classes, per-class precision/recall/F1 and the
confusion matrix from scikit-learn, the images skipped as unreadable),
`eval/<name>_confusion.png`, and the same figure as a TensorBoard image in `eval/`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any, Callable

import numpy as np
import tensorflow as tf
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from research import provenance
from research.config import DatasetRef
from research.data import augment, sources

from research.data import folders
from research.model import backbones
from research.run.checkpoints import load_run
from research.errors import UserError


SPLITS = ("val", "test", "train", "all")


def per_class_metrics(labels: np.ndarray, pred: np.ndarray, class_names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support per class (scikit-learn; 0 where undefined)."""
    p, r, f1, support = precision_recall_fscore_support(labels, pred, labels=np.arange(len(class_names)),
                                                        zero_division=0)
    return [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
             "support": int(support[i])} for i, name in enumerate(class_names)]


def confusion_figure(confusion: np.ndarray, class_names: list[str], title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(min(2 + 0.5 * n, 12), min(1.6 + 0.5 * n, 11)))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if confusion[i, j] > confusion.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def predict_dataset(model, ds) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) over a whole dataset."""
    step = tf.function(lambda x: model(x, training=False))
    logits, labels = [], []
    for x, y in ds:
        logits.append(step(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(logits).astype(np.float64), np.concatenate(labels)


TTA = ("none", "flip", "crops")


def tta_views(mode: str, size: int) -> list:
    """The test-time views of `mode`, each a function of a uint8/float image batch [N, S, S, 3];
    None is the image itself, whose prediction the plain evaluation already made.

    `flip`: the image and its mirror (each through the run's `--eval_crop`). `crops`:
    the image enlarged by 1/0.875 (the usual centre-crop ratio) and cut into its
    centre and four corner crops of the original side, plus the mirror of the
    centre (these replace `--eval_crop`'s view).
    """
    if mode == "flip":
        return [None, lambda x: tf.image.flip_left_right(x)]
    if mode != "crops":
        return [None]
    big = int(round(size / 0.875))
    m = big - size

    def crop(top, left):
        return lambda x: tf.image.resize(tf.cast(x, tf.float32), (big, big))[:, top:top + size, left:left + size]

    centre = crop(m // 2, m // 2)
    return [centre, crop(0, 0), crop(0, m), crop(m, 0), crop(m, m),
            lambda x: tf.image.flip_left_right(centre(x))]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def whole_folder(other: DatasetRef, own: DatasetRef) -> bool:
    """True for another folder dataset without train/val sub-folders: it is evaluated whole.

    The run's own flat folder is not: its whole includes the images it trained on.
    """
    if other.kind != "folder":
        return False
    if not os.path.isdir(other.arg) or folders.folder_split_dirs(other.arg) is not None:
        return False
    return not (own.kind == "folder" and os.path.realpath(own.arg) == os.path.realpath(other.arg))


def evaluate_run(workdir: str, *, dataset: str | None = None, split: str | None = None, checkpoint: str = "best",
                 name: str | None = None, data_dir: str | None = None, skip_bad_images: bool = False,
                 tta: str = "none") -> dict:
    """Evaluates a run's checkpoint.

    Args:
      workdir: the run.
      dataset: another source (`folder:PATH`, `tfds:NAME`, `digits`) with the
        same class names; None means the run's own dataset.
      split: `val`, `test`, `train` or `all` (every image) of the source, split
        as the run split it (`--test`, `--val_fraction`, ...); for TFDS, also any
        split name such as `validation`. None: `all` for another folder without
        split sub-folders (every image is scored), else `val`.
      checkpoint: `best`, `latest` or a checkpoint path.
      name: the report's name (default: derived from dataset and split).
      data_dir: TFDS data directory of `dataset`.
      skip_bad_images: leave out unreadable images (listed in the report's
        `skipped_images`) instead of failing.
      tta: `flip` or `crops` (`tta_views`): the class probabilities averaged over
        the views are scored too, under the report's `tta`, beside the plain numbers.

    Raises:
      UserError: no run, a bad checkpoint, a bad split, an unreadable image, or
        class names that differ.
    """
    if tta not in TTA:
        raise UserError(f"--tta={tta!r} is not valid; allowed values: {', '.join(TTA)}")
    config, model, class_names, path = load_run(workdir, checkpoint=checkpoint)
    if split is None:  # a --refit run has no validation: its own data defaults to test
        split = ("all" if dataset and whole_folder(DatasetRef.parse(dataset), config.data.source)
                 else "test" if config.data.refit and not dataset else "val")
    which = "" if checkpoint == "best" else "_" + os.path.basename(checkpoint.rstrip("/"))
    return score([(config, model)], class_names, {"workdir": workdir, "checkpoint": path}, workdir,
                 dataset=dataset, split=split, name=name, which=which, data_dir=data_dir,
                 skip_bad_images=skip_bad_images, tta=tta)


@dataclasses.dataclass
class SplitData:
    """One split of a run's data, as the run evaluated it.

    Attributes:
      images: (image, label) pairs, unbatched, raw pixels.
      model_input: the run's evaluation view (`--eval_crop`) and preprocessing, of a batch.
      config: the data config it was loaded with.
      skipped: the unreadable images left out.
    """

    images: tf.data.Dataset
    model_input: Callable
    config: Any
    skipped: list[str]

    def batches(self) -> tf.data.Dataset:
        return self.images.batch(64).map(lambda x, y: (self.model_input(x), y))


def split_data(config, size: int, class_names: list[str], *, dataset: str | None, split: str,
               data_dir: str | None = None, skip_bad_images: bool = False) -> SplitData:
    """Loads `split` of the run's data (or of `dataset`, by the run's class names).

    Raises:
      UserError: a bad split, an unreadable image, or class names that differ.
    """
    entry = backbones.get(config.model.backbone)
    cfg = config.data
    source_name = dataset or cfg.dataset
    source_ref = DatasetRef.parse(source_name)
    if source_ref.kind == "tfds":
        if split == "all":
            raise UserError(f"--split=all is for folder and digits datasets; name a split of {source_name} "
                            "instead, e.g. --split=test")
    elif split not in SPLITS:
        raise UserError(f"--split={split!r} is not valid for this dataset; allowed values: {', '.join(SPLITS)}")
    cfg = dataclasses.replace(cfg, skip_bad_images=skip_bad_images or cfg.skip_bad_images)
    if dataset:
        cfg = dataclasses.replace(cfg, dataset=dataset, data_dir=data_dir or cfg.data_dir)
    if split not in SPLITS:  # a named TFDS split, loaded as the validation split and nothing else
        cfg = dataclasses.replace(cfg, val_split=split, test="none")
    if dataset:
        # Another source: take its classes by the run's names, so indices line up.
        other = sources.class_names(cfg)
        missing = [c for c in class_names if c not in other]
        extra = [c for c in other if c not in class_names]
        if missing or extra:
            raise UserError(f"class names of {dataset} differ from the run's: missing {missing or 'none'}, "
                            f"unexpected {extra or 'none'}; the run's classes are {class_names}")
        cfg = dataclasses.replace(cfg, classes=",".join(class_names))
    source = sources.load_source(dataclasses.replace(cfg, batch_size=1), size)
    if source.class_names != class_names:
        raise UserError(f"class names differ: {source.class_names} vs the run's {class_names}")
    if split == "test" and source.test is None:
        raise UserError(f"{source_name} has no test split here (the run's --test={cfg.test}, test: "
                        f"{source.test_from}); evaluate --split=val, or another --dataset")
    if split == "val" and not source.num_val:
        raise UserError(f"{source_name} has no validation split here (a --refit run trains on every pool image); "
                        "evaluate --split=test, or another --dataset")
    parts = {"all": ["train", "val", "test"], "train": ["train"], "test": ["test"]}.get(split, ["val"])
    datasets = [d for d in (getattr(source, p) for p in parts) if d is not None]
    split_ds = datasets[0]
    for d in datasets[1:]:  # `all`: every image of a split-less folder, whichever slice it fell in
        split_ds = split_ds.concatenate(d)
    skipped = [p for part in parts for p in source.skipped_by_split.get(part, [])]
    crop = augment.eval_view(size, cfg.eval_crop) or (lambda x: x)  # as the run evaluated, and the export does

    def model_input(x):
        return entry.preprocess(crop(tf.cast(x, tf.float32)))

    return SplitData(split_ds, model_input, cfg, skipped)


def loss_and_accuracy(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The mean cross-entropy and the accuracy of (log-)probabilities."""
    return (float(-log_probs[np.arange(len(labels)), labels].mean()),
            float((log_probs.argmax(axis=1) == labels).mean()))


def score(members: list, class_names: list[str], head: dict, out_root: str, *, dataset: str | None, split: str,
          name: str | None, which: str = "", data_dir: str | None = None, skip_bad_images: bool = False,
          tta: str = "none") -> dict:
    """Scores one classifier, or the mean class probabilities of several (an ensemble), on
    `split` of the first member's data; writes `out_root/eval/<name>.json` and its figure.

    Args:
      members: `(config, model)` pairs with the same input size and preprocessing.
      head: the report's first keys (what was scored).
    """
    config, model = members[0]
    entry = backbones.get(config.model.backbone)
    size = model.input_shape[1]
    data = split_data(config, size, class_names, dataset=dataset, split=split, data_dir=data_dir,
                      skip_bad_images=skip_bad_images)
    cfg, split_ds, model_input, skipped = data.config, data.images, data.model_input, data.skipped
    ds = data.batches()
    outputs = [predict_dataset(m, ds) for _, m in members]
    labels = outputs[0][1]
    k = len(class_names)
    if len(members) == 1:
        logits = outputs[0][0]
        log_probs = log_softmax(logits)
    else:  # the members' class probabilities averaged: the ensemble's scores are its log-probabilities
        logits = log_probs = _member_mean([log_softmax(out) for out, _ in outputs])
    pred = logits.argmax(axis=1)
    confusion = confusion_matrix(labels, pred, labels=np.arange(k))
    loss, accuracy = loss_and_accuracy(log_probs, labels)
    report = {
        **head, "dataset": cfg.dataset, "split": split,
        "num_examples": int(len(labels)), "class_names": class_names,
        "loss": loss,
        "accuracy": accuracy,
        "per_class": per_class_metrics(labels, pred, class_names),
        "confusion_matrix": confusion.tolist(),
        "skipped_images": skipped,
        "provenance": provenance.provenance(),
    }
    if k > 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        report["top5_accuracy"] = float((top5 == labels[:, None]).any(axis=1).mean())
    report["macro_f1"] = float(np.mean([c["f1"] for c in report["per_class"]]))
    if tta != "none":
        # `crops` views are crops already: the run's --eval_crop applies to the others only.
        view_input = (lambda x: entry.preprocess(tf.cast(x, tf.float32))) if tta == "crops" else model_input
        probs = [np.exp(log_probs if view is None else _member_mean([log_softmax(predict_dataset(
            m, split_ds.batch(64).map(lambda x, y, view=view: (view_input(view(x)), y)))[0]) for _, m in members]))
                 for view in tta_views(tta, size)]
        mean = np.mean(probs, axis=0)
        tta_pred = mean.argmax(axis=1)
        report["tta"] = {"mode": tta, "views": len(probs), "accuracy": float((tta_pred == labels).mean()),
                         "loss": float(-np.log(mean[np.arange(len(labels)), labels]).mean())}
    if not name:
        # One report per dataset, split and checkpoint: `latest` or `ema` does not overwrite `best`'s.
        name = f"{(dataset or 'own').replace(':', '_').replace('/', '_').strip('_')}_{split}{which}"
    out = os.path.join(out_root, "eval")
    report["report"] = os.path.join(out, f"{name}.json")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    png = confusion_figure(confusion, class_names, f"{name}: accuracy {report['accuracy']:.4f}")
    with open(os.path.join(out, f"{name}_confusion.png"), "wb") as f:
        f.write(png)
    with tf.summary.create_file_writer(out).as_default(step=0):
        tf.summary.image(f"confusion/{name}", tf.io.decode_png(png)[None], max_outputs=1)
    return report


def _member_mean(log_probs: list[np.ndarray]) -> np.ndarray:
    """One member's log-probabilities as they are; several members' mean probability, as a log."""
    return log_probs[0] if len(log_probs) == 1 else np.log(np.mean(np.exp(log_probs), axis=0))
