"""Distribution strategy and precision policy selection.

`--strategy=auto` picks MirroredStrategy when more than one GPU is visible,
else the default strategy. `--cpu_devices=N` splits the CPU into N logical
devices (it must run before TensorFlow initialises its devices), so mirrored
training can be run and tested on a machine without a GPU.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf
from absl import logging
from tensorflow.python.framework import config as tf_config

from research.errors import UserError


def split_cpu(n: int) -> None:
    """Splits the physical CPU into `n` logical devices (call before any TF op)."""
    if n <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        # Already initialised: fine if the split is already in place.
        if len(tf.config.list_logical_devices("CPU")) < n:
            raise UserError(f"--cpu_devices={n}: TensorFlow was initialised before the CPU could be split")


def list_devices() -> list:
    """Initialises TensorFlow's devices (after `split_cpu`) and lists them."""
    return tf.config.list_logical_devices()


def make_strategy(name: str, *, collective_timeout: float = 0.0) -> tf.distribute.Strategy:
    """Returns the strategy for `--strategy`.

    Raises:
      UserError: unknown name, or a strategy this machine cannot provide.
    """
    if name == "multi_worker":
        # Before anything lists devices: collectives must be configured before
        # the TF context initialises.
        if "TF_CONFIG" not in os.environ:
            raise UserError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                            "(see README: multi-worker training, or use launch/multiworker.py)")
        options = tf.distribute.experimental.CommunicationOptions(
            timeout_seconds=collective_timeout or None)
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    gpus = tf.config.list_logical_devices("GPU")
    cpus = tf.config.list_logical_devices("CPU")
    if name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    if name == "mirrored":
        devices = [d.name for d in gpus] or [d.name for d in cpus]
        # NCCL needs GPUs; on logical CPU devices reduce with plain copies.
        cross = None if gpus else tf.distribute.ReductionToOneDevice()
        return tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as e:
            raise UserError(f"--strategy=tpu: no TPU found ({str(e).splitlines()[0]})") from None
        return tf.distribute.TPUStrategy(resolver)
    raise UserError(f"--strategy={name!r} is not valid; allowed values: auto, default, one_device, mirrored, multi_worker, tpu")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (always, except non-chief workers)."""
    from research.run.preflight import chief_of  # the one rule, also read before TensorFlow starts
    return chief_of("multi_worker" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else "")


def worker_of(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """`(this worker's index, the number of workers)`: the chief first, then the workers
    in TF_CONFIG order (the order of MultiWorkerMirroredStrategy's input pipelines);
    `(0, 1)` for a single-worker strategy."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0, 1
    resolver = strategy.cluster_resolver
    spec = resolver.cluster_spec().as_dict()
    tasks = [("chief", i) for i in range(len(spec.get("chief", [])))] + \
            [("worker", i) for i in range(len(spec.get("worker", [])))]
    return tasks.index((resolver.task_type, resolver.task_id)), len(tasks)


def setup(cfg) -> tf.distribute.Strategy:
    """The run's runtime, in the order TensorFlow needs it: the strategy first
    (MultiWorkerMirroredStrategy must exist before any other op runs; `--cpu_devices`
    splits the CPU before that), then op determinism, the global seed and the
    precision policy.

    Raises:
      UserError: `--cpu_devices` asked after TensorFlow initialised its devices.

    Args:
      cfg: the `TrainConfig`.
    """
    split_cpu(cfg.cpu_devices)
    strategy = make_strategy(cfg.strategy, collective_timeout=cfg.collective_timeout)
    # Every process-wide setting is set, not only turned on, and Keras's global state (name
    # counters, the global seed generator, the dtype policy) is cleared: a second run in one
    # process starts from what a new process starts from.
    keras.backend.clear_session()
    set_determinism(cfg.deterministic)
    keras.utils.set_random_seed(cfg.seed)
    set_precision(cfg.precision)
    return strategy


def set_determinism(on: bool) -> None:
    """Op determinism (`--deterministic`) on or off for the whole process."""
    if on:
        tf.config.experimental.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()  # TensorFlow exports only the enable


def describe(strategy: tf.distribute.Strategy) -> str:
    """`MirroredStrategy over 2 devices (CPU:0, CPU:1)`, for the first lines of a run."""
    try:
        devices = list(strategy.extended.worker_devices)
    except RuntimeError:  # the default strategy: the first GPU if any, else the CPU
        devices = [d.name for d in (tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU"))[:1]]
    short = [d.split("device:")[-1] for d in devices]
    return f"{type(strategy).__name__.replace('_DefaultDistributionStrategy', 'default strategy')} on " \
           f"{', '.join(short)}"


def use_xla(setting: str) -> bool:
    """`--jit_compile`: `auto` is Keras's own rule, XLA on GPU/TPU and off on CPU."""
    if setting == "auto":
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return setting == "true"


def set_precision(policy: str) -> None:
    """Sets the global Keras dtype policy (`float32`, `mixed_float16`, `mixed_bfloat16`)."""
    if policy == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        # CPUs have no fast float16 kernels: each op casts, and a run is several times slower.
        logging.warning("--precision=mixed_float16 without a GPU runs several times slower than float32 on this "
                        "CPU; it is meant for GPUs (mixed_bfloat16 suits CPUs with bfloat16 support)")
    keras.mixed_precision.set_global_policy(policy)
