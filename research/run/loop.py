"""The training loop: a per-replica step, a multi-step tf.function, evaluation.

Three layers, as in SimCLR's `run.py` and Orbit's StandardTrainer:

1. `Trainer._replica_step`: one optimizer update on one replica. The forward
   pass, loss and gradients are taken over `self.variables`, an explicit list
   (see `research/model/unfreeze.py`); only those variables are updated.
2. `Trainer.train_fn`: a `tf.function` that runs `num_steps` steps, pulling
   batches with `next(iterator)` inside the graph, and returns summed metrics.
   Host and device synchronise once per call, not once per step.
3. The eager outer loop (`research/run/controller.py`): epochs, evaluation, summaries,
   checkpoints, early stopping.

A fresh `tf.function` is made whenever the trainable set changes
(`set_trainable`): Keras reads `layer.trainable` at trace time, so a step
traced for one stage would silently keep training the old variable list.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

# The metric sums a step returns, by name: summed over steps and replicas, then turned
# into means by `metrics_from_sums`. A new metric is one more key here and in `_sums`
# (or the step's own), and one line in `metrics_from_sums`; checkpoints store them by name.
SUM_KEYS = ("loss_sum", "correct", "top5", "count", "grad_norm", "steps")


def zero_sums() -> dict[str, float]:
    return {k: 0.0 for k in SUM_KEYS}


def _sums(y, logits, per_example_loss) -> dict[str, tf.Tensor]:
    y = tf.cast(y, tf.int32)
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    k = min(5, logits.shape[-1])
    top5 = tf.math.in_top_k(y, tf.cast(logits, tf.float32), k)
    return {
        "loss_sum": tf.reduce_sum(per_example_loss),
        "correct": tf.reduce_sum(tf.cast(tf.equal(pred, y), tf.float32)),
        "top5": tf.reduce_sum(tf.cast(top5, tf.float32)),
        "count": tf.cast(tf.shape(y)[0], tf.float32),
        "grad_norm": tf.constant(0.0),
        "steps": tf.constant(0.0),
    }


def _add(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def _zeros() -> dict[str, tf.Tensor]:
    return {k: tf.constant(0.0) for k in SUM_KEYS}


# Across replicas the sums travel as one vector in SUM_KEYS order: MultiWorkerMirroredStrategy's
# reduce refuses a dict of per-replica tensors ("Expected any non-tensor type").
def _pack(sums: dict[str, tf.Tensor]) -> tf.Tensor:
    return tf.stack([sums[k] for k in SUM_KEYS])


def _unpack(vector: tf.Tensor) -> dict[str, tf.Tensor]:
    return {k: vector[i] for i, k in enumerate(SUM_KEYS)}


class Trainer:
    """Owns the step functions for one model and the optimizer stepping it.

    Args:
      model: the classifier (float32 logits).
      optimizer: the run's optimizer, already built on every variable its stages may
        train (`set_trainable` switches to a stage's own, built on its stages').
      strategy: a `tf.distribute.Strategy` (the default strategy on one device).
      grad_accum_steps: micro-batches per optimizer update. Gradients are summed
        in-graph within one step, so this works under MirroredStrategy (Keras's
        own `gradient_accumulation_steps` does not: keras issue 20582).
      jit_compile: XLA-compile the per-replica step (off by default: ~8x slower on CPU).
      label_smoothing: smooths the training targets (evaluation stays plain cross-entropy).
      class_weights: one loss weight per class for training examples, as
        `model.fit(class_weight=...)` (evaluation is unweighted).
    """

    def __init__(self, model: keras.Model, optimizer, *, strategy: tf.distribute.Strategy,
                 grad_accum_steps: int = 1, jit_compile: bool = False, label_smoothing: float = 0.0,
                 class_weights: list[float] | None = None):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.grad_accum_steps = grad_accum_steps
        self.jit_compile = jit_compile
        # Keras's default reduction divides by the number of replicas under a
        # strategy, so summing replica gradients gives the global-batch mean.
        self.label_smoothing = float(label_smoothing)
        self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
        self.sparse_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.soft_loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=self.label_smoothing)
        self.variables: list = []
        self.lr_multipliers: list[float] = []
        # --log_block_grads: the block index of each trained variable (-1: not in a block),
        # and the summed squared gradient norm per block since the last `take_block_sums`.
        self.num_blocks = 0
        self.block_ids: list[int] = []
        self.block_sums = np.zeros(0)
        self.block_steps = 0
        self.train_fn = None
        self.eval_fn = self._make_eval_fn()

    # -- the step --------------------------------------------------------------

    def set_trainable(self, variables: list, lr_multipliers: dict[str, float] | None = None,
                      optimizer=None) -> None:
        """Sets the explicit variable list (and the optimizer that steps it, when a stage
        has its own) and makes a fresh traced step for it."""
        self.optimizer = optimizer or self.optimizer
        self.variables = list(variables)
        mult = lr_multipliers or {}
        self.lr_multipliers = [float(mult.get(v.path, 1.0)) for v in self.variables]
        self.num_blocks, self.block_ids, self.block_sums = 0, [], np.zeros(0)
        self.train_fn = self._make_train_fn()

    def track_blocks(self, block_of: dict[str, int], num_blocks: int) -> None:
        """Sums each block's squared gradient norm in the step (`--log_block_grads`);
        a fresh traced step for the current variables.

        Args:
          block_of: `{variable path: block index}`; a variable not in it is in no block.
          num_blocks: the number of blocks the indices count.
        """
        self.num_blocks = num_blocks
        self.block_ids = [block_of.get(v.path, -1) for v in self.variables]
        self.block_sums = np.zeros(num_blocks)
        self.train_fn = self._make_train_fn()

    def _loss_and_grads(self, x, y):
        # Labels are class indices, or soft targets [batch, classes] from mixup/CutMix
        # (known when the step is traced).
        soft = y.shape.rank == 2
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            k = logits.shape[-1]
            dense = soft or self.label_smoothing
            target = (y if soft else tf.one_hot(tf.cast(y, tf.int32), k)) if dense else y
            weight = None
            if self.class_weights is not None:
                weight = (tf.reduce_sum(target * self.class_weights, axis=-1) if soft
                          else tf.gather(self.class_weights, tf.cast(y, tf.int32)))
            loss = (self.soft_loss if dense else self.sparse_loss)(target, logits, sample_weight=weight)
            # Identity for a plain optimizer; LossScaleOptimizer multiplies by its scale.
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, self.variables)
        if dense:
            per_example = keras.losses.categorical_crossentropy(target, logits, from_logits=True,
                                                                label_smoothing=self.label_smoothing)
        else:
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        if weight is not None:  # train/loss is the weighted objective, as fit reports it
            per_example = per_example * weight
        # train/accuracy of a mixed batch counts the class with the larger share.
        labels = tf.argmax(y, axis=-1, output_type=tf.int32) if soft else y
        return grads, _sums(labels, logits, per_example)

    def _replica_step(self, batches):
        """One optimizer update from `grad_accum_steps` micro-batches on this replica."""
        grads, sums = None, _zeros()
        for x, y in batches:
            g, s = self._loss_and_grads(x, y)
            g = [tf.zeros_like(v) if gi is None else tf.convert_to_tensor(gi) for gi, v in zip(g, self.variables)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
            sums = _add(sums, s)
        if len(batches) > 1:
            grads = [g / len(batches) for g in grads]
        scaled = [(v, m) for v, m in zip(self.variables, self.lr_multipliers) if m != 1.0]
        old = [tf.identity(v) for v, _ in scaled]
        # The loss scale these gradients carry (apply may change a dynamic scale).
        unscale = tf.cast(self.optimizer.scale_loss(1.0), tf.float32)
        self.optimizer.apply(grads, self.variables)
        if scaled:
            self._rescale_updates(scaled, old)
        # Diagnostic: the unscaled global gradient norm, averaged over replicas.
        # Computed after the update so it cannot alter how the update is computed.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync if tf.distribute.has_strategy() else 1
        with tf.control_dependencies([self.optimizer.iterations]):
            norm = tf.linalg.global_norm(grads) / tf.cast(self.optimizer.scale_loss(1.0), tf.float32)
            # Per block: the squared norm of the gradients the step already has, summed
            # over the loop call with the other sums (no extra pass, no host sync). A
            # replica's gradient is 1/replicas of its local mean's (the loss reduction),
            # so R * ||g_r||^2, summed over replicas, is the mean of the local squared norms.
            block_sq = [tf.add_n([tf.reduce_sum(tf.square(tf.cast(grads[i], tf.float32)))
                                  for i, b in enumerate(self.block_ids) if b == j] or [tf.constant(0.0)])
                        for j in range(self.num_blocks)]
            if block_sq:
                block_sq = tf.stack(block_sq) * replicas / (unscale * unscale)
                block_sq = tf.where(tf.math.is_finite(block_sq), block_sq, 0.0)  # a skipped fp16 step
            else:
                block_sq = tf.zeros([0])
        sums = dict(sums, grad_norm=sums["grad_norm"] + norm / replicas, steps=sums["steps"] + 1.0 / replicas)
        return _pack(sums), block_sq

    def _rescale_updates(self, scaled, old) -> None:
        """Layer-wise LR decay: variable v moves by `mult` times the optimizer's update.

        Exactly a per-variable learning rate for SGD (with momentum), Adam and
        AdamW, whose stored slots do not depend on the learning rate, while the
        run keeps one optimizer for them.
        """
        ctx = tf.distribute.get_replica_context()

        def update_all(strategy, pairs):
            for (v, m), o in pairs:
                strategy.extended.update(v.value, lambda var, o, m=m: var.assign(o + m * (var - o)), args=(o,))

        if ctx is None or self.strategy.num_replicas_in_sync == 1:
            for (v, m), o in zip(scaled, old):
                v.assign(o + m * (v - o))
        else:
            ctx.merge_call(update_all, args=(list(zip(scaled, old)),))

    def _make_train_fn(self):
        step = tf.function(self._replica_step, jit_compile=True) if self.jit_compile else self._replica_step
        accum = self.grad_accum_steps
        strategy = self.strategy

        num_blocks = self.num_blocks

        @tf.function
        def train_fn(iterator, num_steps):
            sums = _zeros()
            blocks = tf.zeros([num_blocks])
            first_bad = tf.constant(-1, tf.int64)
            for i in tf.range(tf.cast(num_steps, tf.int64)):
                batches = tuple(next(iterator) for _ in range(accum))
                per_replica, per_replica_blocks = strategy.run(step, args=(batches,))
                s = _unpack(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
                if num_blocks:
                    blocks += strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica_blocks, axis=None)
                bad = tf.logical_not(tf.math.is_finite(s["loss_sum"]))
                first_bad = tf.where(bad & (first_bad < 0), i, first_bad)
                sums = _add(sums, s)
            return sums, first_bad, blocks

        # A fresh function per trainable set is the design (see the module docstring),
        # so TF's "frequent retracing" warning, which counts traces across functions,
        # would fire at every step of gradual unfreezing for nothing.
        train_fn._omit_frequent_tracing_warning = True
        return train_fn

    def train(self, iterator, num_steps: int) -> tuple[dict[str, float], int]:
        """Runs `num_steps` optimizer updates.

        Returns:
          (summed metrics by name, index of the first step with a non-finite loss or -1).
        """
        sums, first_bad, blocks = self.train_fn(iterator, tf.constant(num_steps, tf.int64))
        if self.num_blocks:
            self.block_sums += blocks.numpy().astype(np.float64)
            self.block_steps += num_steps
        return _to_host(sums), int(first_bad)

    def take_block_sums(self) -> tuple[np.ndarray, int]:
        """Per block, the squared gradient norms summed over the steps since the last call
        (replicas' local gradients, averaged over replicas), and those steps; resets them."""
        out = (self.block_sums, self.block_steps)
        self.block_sums, self.block_steps = np.zeros(self.num_blocks), 0
        return out

    # -- evaluation ------------------------------------------------------------

    def _make_eval_fn(self):
        model, strategy = self.model, self.strategy

        def replica_eval(x, y):
            logits = model(x, training=False)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            return _pack(_sums(y, logits, per_example))

        @tf.function
        def eval_fn(dist_dataset):
            sums = _zeros()
            for x, y in dist_dataset:
                sums = _add(sums, _unpack(strategy.reduce(tf.distribute.ReduceOp.SUM,
                                                          strategy.run(replica_eval, args=(x, y)), axis=None)))
            return sums

        return eval_fn

    def evaluate(self, dist_dataset) -> dict[str, float]:
        """Loss, accuracy and top-5 accuracy over a whole (distributed) dataset."""
        return metrics_from_sums(_to_host(self.eval_fn(dist_dataset)))

    def tracing_count(self) -> int:
        return self.train_fn.experimental_get_tracing_count() if self.train_fn else 0


def _to_host(sums: dict[str, tf.Tensor]) -> dict[str, float]:
    return {k: float(np.float64(v.numpy())) for k, v in sums.items()}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Host-side running sums (float64), key by key; a key missing on one side counts 0."""
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in {**a, **b}}


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums["count"], 1.0)
    out = {"loss": float(sums["loss_sum"] / n), "accuracy": float(sums["correct"] / n),
           "top5_accuracy": float(sums["top5"] / n), "count": int(sums["count"])}
    if sums["steps"] > 0:
        out["grad_norm"] = float(sums["grad_norm"] / sums["steps"])
    return out
