"""Several runs as one classifier: their class probabilities averaged (the fold ensemble
of a cross-validated recipe, or any runs of one dataset and input).

`export_ensemble` writes the same `export/` as a single run's (research/serve/export.py):
`model.keras` and `saved_model/` take pixels and return the mean probabilities, so
`launch.predict` uses an ensemble like any other export. `evaluate_ensemble` scores the
mean probabilities exactly as `launch.evaluate` scores one run (research/serve/evaluate.py).
"""

from __future__ import annotations

import os

import keras

from research.errors import UserError
from research.run.checkpoints import load_run, run_features
from research.serve import evaluate, export


def load_members(workdirs: list[str], checkpoint: str = "latest") -> tuple[list, list[str], list[str]]:
    """Each run's `(config, model)`, their class names and checkpoint paths.

    Raises:
      UserError: fewer than two runs, or runs that differ in classes, input size,
        preprocessing or evaluation crop (their probabilities would not be of one input).
    """
    workdirs = [w for w in workdirs if w]
    if len(workdirs) < 2:
        raise UserError(f"an ensemble needs at least two runs, got {len(workdirs)}: {', '.join(workdirs) or 'none'}")
    members, paths, names = [], [], None
    for wd in workdirs:
        config, model, class_names, path = load_run(wd, checkpoint=checkpoint)
        if names is None:
            names, first = class_names, (config, model)
        kept = {"classes": class_names, "input size": model.input_shape[1],
                "backbone (its preprocessing)": config.model.backbone, "--eval_crop": config.data.eval_crop}
        ref = {"classes": names, "input size": first[1].input_shape[1],
               "backbone (its preprocessing)": first[0].model.backbone, "--eval_crop": first[0].data.eval_crop}
        for what in kept:
            if kept[what] != ref[what]:
                raise UserError(f"runs {workdirs[0]} and {wd} differ in {what} ({ref[what]} vs {kept[what]}): "
                                "an ensemble's members take one input")
        members.append((config, model))
        paths.append(path)
    return members, names, paths


def _splitting(data) -> tuple:
    """What decides a run's test split and its pool: equal for the folds of one recipe."""
    return (data.dataset, data.classes, data.test, data.test_split, data.test_fraction, data.val_split,
            data.train_split)


def ensemble_model(members: list, class_names: list[str], paths: list[str]) -> keras.Model:
    """Pixels in [0, 255] -> each member's inference model (research/serve/export.py) ->
    the mean of their probabilities."""
    config, model = members[0]
    inputs = keras.Input(model.input_shape[1:], name="pixels")
    probs = [export.inference_model(export.exportable(c, m, p, class_names), c.model.backbone,
                                    eval_crop=c.data.eval_crop, name=f"member{i}")(inputs)
             for i, ((c, m), p) in enumerate(zip(members, paths))]
    mean = keras.layers.Average(dtype="float32", name="probabilities")(probs)
    return keras.Model(inputs, mean, name="ensemble_with_preprocessing")


def export_ensemble(workdirs: list[str], out_dir: str, *, checkpoint: str = "latest") -> dict:
    """Writes `out_dir/model.keras`, `saved_model/` and `labels.json` (which names the members).

    Raises:
      UserError: as `load_members`.
    """
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # as a single run's export: portable to any device
    try:
        members, class_names, paths = load_members(workdirs, checkpoint)
        config, model = members[0]
        meta = {"class_names": class_names, "image_size": model.input_shape[1], "backbone": config.model.backbone,
                "features": [run_features(c, p) for (c, _), p in zip(members, paths)],
                "checkpoint": paths, "members": [os.path.abspath(w) for w in workdirs],
                "combine": "mean of the members' class probabilities",
                "input": export.INPUT, "eval_crop": config.data.eval_crop}
        return export.write_export(ensemble_model(members, class_names, paths), meta, out_dir)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def evaluate_ensemble(workdirs: list[str], out_dir: str, *, dataset: str | None = None, split: str | None = None,
                      checkpoint: str = "latest", name: str | None = None, data_dir: str | None = None,
                      skip_bad_images: bool = False, tta: str = "none") -> dict:
    """Scores the members' mean probabilities; writes `out_dir/eval/<name>.json`.

    `split` defaults to `test` (`all` for another folder without split sub-folders). A
    split that differs between members (`val`, `train` of different folds) is refused:
    one member's validation is another's training data.

    Raises:
      UserError: as `load_members`, or a split the members do not share.
    """
    if tta not in evaluate.TTA:
        raise UserError(f"--tta={tta!r} is not valid; allowed values: {', '.join(evaluate.TTA)}")
    members, class_names, paths = load_members(workdirs, checkpoint)
    own = members[0][0].data
    if split is None:
        split = "all" if dataset and evaluate.whole_folder(evaluate.DatasetRef.parse(dataset), own.source) else "test"
    splits = [_splitting(c.data) for c, _ in members]
    if any(s != splits[0] for s in splits[1:]):
        raise UserError("the members split their data differently (other data, classes or test split): their "
                        "test images would be another member's training images")
    if not dataset and split in ("val", "train", "all") and any(c.data != own for c, _ in members[1:]):
        raise UserError(f"--split={split}: the members split their data differently (e.g. other folds), so one "
                        "member's validation is another's training; score --split=test or another --dataset")
    which = "" if checkpoint == "latest" else "_" + os.path.basename(checkpoint.rstrip("/"))
    return evaluate.score(members, class_names, {"members": [os.path.abspath(w) for w in workdirs],
                                                 "checkpoint": paths}, out_dir,
                          dataset=dataset, split=split, name=name or None, which=which, data_dir=data_dir,
                          skip_bad_images=skip_bad_images, tta=tta)
