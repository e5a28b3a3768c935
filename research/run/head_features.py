"""What the head reads (`--features`), resolved before the model is built.

`top`, a block, or several are known from the config. `auto` is measured once, at the
run's start, as `auto:probe` unfreeze specs are: the whole backbone with the weights
the run starts from, a linear probe on every block's pooled output
(research/model/probe.py), validation accuracy; the head reads the block the probes
peak at (the first block at the best validation accuracy). Test is never read. The
choice is recorded in the run state, in every checkpoint, so a resumed run, `best/`,
evaluate and export rebuild the same cut model without measuring again
(`research.run.checkpoints.run_features`).
"""

from __future__ import annotations

import os
import time

from research.config import ExperimentConfig
from research.model import backbones
from research.run.run_state import RunState


def recorded(workdir: str) -> dict | None:
    """The features record of the run in `workdir`, from its newest checkpoint that has one
    (every checkpoint of a run records the same choice); None for a run not started.

    Raises:
      UserError: `ckpt/` lists checkpoints but none can tell the choice (a resume would fail
        anyway, after measuring for nothing).
    """
    from research.errors import UserError
    from research.run import checkpoints

    paths = checkpoints.listed_checkpoints(os.path.join(workdir, "ckpt"))
    for path in reversed(paths):
        run = checkpoints.run_state_of(path)
        if run is not None and run.features:
            return run.features
    if paths:
        raise UserError(f"no readable checkpoint in {os.path.join(workdir, 'ckpt')!r} records which block "
                        "--features=auto chose; move it aside to start the run again")
    return None


def resolve(config: ExperimentConfig, workdir: str, strategy, source, pipeline, *, say=print) -> dict:
    """The features record of this run: the resumed run's own, or for a new one `--features`
    as given, or, for `auto`, measured now (writes nothing)."""
    spec = config.model.features
    if spec != "auto":
        return {"spec": spec, "resolved": spec}
    record = recorded(workdir)
    if record is not None:
        return record
    return measure(config, strategy, source, pipeline, say=say)


def measure(config: ExperimentConfig, strategy, source, pipeline, *, say=print) -> dict:
    """Probes every block of the whole backbone, initialised as the run will be, on the
    training and validation images; the head will read the peak block.

    Draws nothing from the run's random streams: the model it builds for measuring takes
    its initial values from them, which are put back after, so the run that follows is
    the run `--features=BLOCK` would be, to the bit.
    """
    import random

    import numpy as np

    states = random.getstate(), np.random.get_state()  # Keras's initializers draw their seeds from these
    try:
        return _measure(config, strategy, source, pipeline, say=say)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])


def _measure(config: ExperimentConfig, strategy, source, pipeline, *, say=print) -> dict:
    from research.model import probe
    from research.run import build as build_lib

    t0 = time.perf_counter()
    whole = build_lib.build(config, source.num_classes, strategy, features="top")
    build_lib.init_weights(config, whole)
    backbone = config.model.backbone
    names = backbones.blocks(whole.base, backbone)
    # The splits as decoded, not the pipeline's caches: a disk cache is written later, whole.
    feats, labels = probe.split_features(probe.tap_model(whole.base, backbone), {
        "train": (source.train, pipeline.train_preprocess, source.num_train),
        "val": (source.val, pipeline.eval_preprocess, source.num_val)})
    rows = probe.probe_curve(feats, labels, names, log=lambda text: None)
    scores = {r["block"]: r["val_accuracy"] for r in rows}
    peak = probe.peak(rows)
    seconds = time.perf_counter() - t0
    say(f"features: auto chose {peak} by linear probes on validation "
        f"({', '.join(f'{b} {s:.3g}' for b, s in scores.items())}; {seconds:.1f}s)")
    return {"spec": "auto", "resolved": peak, "scores": scores, "seconds": seconds}


def check_specs(config: ExperimentConfig, record: dict) -> None:
    """Every stage's unfreeze spec against the blocks `auto`'s choice keeps (the others were
    checked before TensorFlow started, `research.run.preflight.validate`).

    Raises:
      UserError: a spec naming a block above the chosen one.
    """
    from research.errors import UserError
    from research.model import unfreeze

    if record["spec"] != "auto":
        return
    blocks = backbones.kept_blocks(config.model.backbone, record["resolved"])
    for stage in config.stages:
        try:
            unfreeze.resolve_blocks(stage.spec, blocks, backbone=config.model.backbone)
        except UserError as e:
            raise UserError(f"{e} (--features=auto chose {record['resolved']}, which keeps only these; name a "
                            "block for --features, or unfreeze by top:K)") from None


def describe(record: dict, backbone: str, built) -> dict:
    """The record completed from the built model: the blocks read, and the parameters the
    cut base keeps of the whole one (`results.json` and `trainable.json`)."""
    from research.model.unfreeze import count_params, is_lora_factor

    def loaded(model):  # as trainable.json counts a backbone: every weight but LoRA's factors
        return count_params([v for v in model.weights if not is_lora_factor(v)])

    return dict(record, blocks=backbones.feature_blocks(backbone, record["resolved"]),
                backbone_params=loaded(built.base), whole_backbone_params=loaded(built.whole or built.base))


def start(run: RunState, record: dict) -> None:
    """Records the choice in a new run's state (a resumed run has it already)."""
    if not run.features:
        run.features = record
