"""`--log_block_grads`: per block and epoch, how hard the data pulls on it and how far it moved.

`train/block_rgn/BLOCK` is the relative gradient norm (the RMS over the epoch's
steps of the block's gradient norm, over its weight norm), summed inside the
training step (research/run/loop.py); `train/block_change/BLOCK` is
‖θ - θ_start‖ / ‖θ_start‖ since the stage began. The stage's starting weights
are kept in `block_grads/STAGE.npz` beside its start step, so a resumed stage
measures change from the same point.
"""

from __future__ import annotations

import os

import numpy as np

from research.run.actions.base import Action, Context


class BlockGrads(Action):
    name = "block_grads"

    @classmethod
    def enabled(cls, config) -> bool:
        return config.train.log_block_grads

    def __init__(self, config):
        super().__init__(config)
        self._blocks: dict[str, list] = {}
        self._start: dict[str, list[np.ndarray]] = {}

    def setup(self, ctx: Context) -> None:
        from research.model import probe

        # The variables a run could train, by block.
        self._blocks = probe.block_variables(ctx.built.model, self.config.model.backbone,
                                             train_bn=self.config.model.train_bn)

    def trainable_set(self, ctx: Context, run, stage, selection, inputs) -> None:
        if inputs.kind != "images":
            return
        block_of = {v.path: i for i, vs in enumerate(self._blocks.values()) for v in vs}
        inputs.trainer.track_blocks(block_of, len(self._blocks))
        self._start = self._stage_start_weights(ctx, run, stage)

    def train_metrics(self, ctx: Context, run, stage, inputs) -> dict[str, float]:
        if inputs.kind != "images":
            return {}
        sq, steps = inputs.trainer.take_block_sums()
        if not steps:
            return {}
        out = {}
        for i, (b, vs) in enumerate(self._blocks.items()):
            now = [v.numpy() for v in vs]
            norm = float(np.sqrt(sum(np.sum(np.square(w, dtype=np.float64)) for w in now)))
            start = self._start[b]
            moved = float(np.sqrt(sum(np.sum(np.square(w - w0, dtype=np.float64)) for w, w0 in zip(now, start))))
            start_norm = float(np.sqrt(sum(np.sum(np.square(w0, dtype=np.float64)) for w0 in start)))
            out[f"block_rgn/{b}"] = float(np.sqrt(sq[i] / steps)) / max(norm, 1e-12)
            out[f"block_change/{b}"] = moved / max(start_norm, 1e-12)
        return out

    def _stage_start_weights(self, ctx: Context, run, stage) -> dict[str, list[np.ndarray]]:
        """Every block's weights when the stage began. A file of another start (a run begun
        again without a checkpoint), or of other variables, is replaced."""
        path = os.path.join(ctx.workdir, "block_grads", f"{stage.name}.npz")
        keys = {f"{b}/{i}": tuple(v.shape) for b, vs in self._blocks.items() for i, v in enumerate(vs)}
        if os.path.exists(path):
            with np.load(path) as f:
                if (int(f["stage_start_step"]) == run.stage_start_step
                        and {k: f[k].shape for k in f.files if k != "stage_start_step"} == keys):
                    return {b: [f[f"{b}/{i}"] for i in range(len(vs))] for b, vs in self._blocks.items()}
        start = {b: [np.array(v.numpy()) for v in vs] for b, vs in self._blocks.items()}
        if ctx.chief:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp.npz"
            np.savez(tmp, stage_start_step=run.stage_start_step,
                     **{f"{b}/{i}": w for b, ws in start.items() for i, w in enumerate(ws)})
            os.replace(tmp, path)
        return start
