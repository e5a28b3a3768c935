"""Runs one experiment: `python -m launch.train --workdir=DIR [--preset=NAME] [flags]`.

Running it again with the same --workdir resumes from the latest checkpoint.
Default: small_cnn trained from scratch on the embedded digits, 20 epochs
(~30 s on a 2-core CPU, val accuracy ~0.97). Exit status: 0 done, 2 user
error, 3 non-finite loss, 4 workdir not writable, 75 interrupted (resumable).
"""

from __future__ import annotations

from launch import common  # noqa: F401  (sets TF log level before TF loads)

from absl import app, flags

from research import config as C
from research.run import preflight  # every check of the config; imports no TensorFlow

F = flags.FLAGS

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string}


def define_flags(fv: flags.FlagValues, config_cls: type = C.ExperimentConfig) -> None:
    """Defines every flag on `fv`: one per config field (name, default, type and help
    from its declaration in research/config/sections.py), the stage fields of the
    fine-tuning stage, and the few that only this launcher reads."""
    for f in C.flag_fields(config_cls) + C.flag_fields(C.StageConfig):
        if f.enum:
            flags.DEFINE_enum(f.flag, f.default, list(f.enum), f.help, flag_values=fv)
        else:
            _DEFINE[f.type](f.flag, f.default, f.help, flag_values=fv)
    flags.DEFINE_string("workdir", None, "Run directory (config, checkpoints, TensorBoard logs, results).",
                        flag_values=fv)
    flags.DEFINE_string("preset", None, "A named recipe (research/studies/presets.py: quickstart, ants_top2, "
                        "features, lp_ft); flags given override it.", flag_values=fv)
    flags.DEFINE_bool("train_bn", False, "Alias of --bn=train.", flag_values=fv)
    flags.DEFINE_integer("epochs", None, "Epochs of a single-stage run (the same as --finetune_epochs without "
                         "--head_epochs).", flag_values=fv)
    flags.DEFINE_integer("head_epochs", 0, "Epochs of a head-only first stage (0: none).", flag_values=fv)
    flags.DEFINE_float("finetune_lr", None, "Learning rate of the fine-tuning stage (default: --lr).", flag_values=fv)
    flags.DEFINE_string("stages", "", "General stages, overriding the simple flags: "
                        "'unfreeze=none epochs=5 lr=1e-3; unfreeze=top:2 epochs=5 lr=1e-4 warmup=1'", flag_values=fv)
    flags.DEFINE_bool("allow_config_change", False, "Resume an unfinished run even though the config changed.",
                      flag_values=fv)


def apply_preset(fv: flags.FlagValues) -> None:
    """Fills every flag not given on the command line from `--preset`.

    Raises:
      UserError: an unknown preset.
    """
    if not fv.preset:
        return
    from research.studies import presets
    for name, value in presets.get(fv.preset).items():
        if not fv[name].present:
            fv[name].value = value


def _bn_policy(fv) -> str:
    if fv["train_bn"].present and fv.train_bn:
        if fv["bn"].present and fv.bn != "train":
            raise C.UserError(f"--train_bn is --bn=train; it contradicts --bn={fv.bn}")
        return "train"
    return fv.bn


def config_from_flags(fv: flags.FlagValues = F, config_cls: type = C.ExperimentConfig) -> C.ExperimentConfig:
    """Flags -> a validated config (no TensorFlow import).

    Raises:
      UserError: any invalid value.
    """
    apply_preset(fv)
    stage = {f.path[-1]: fv[f.flag].value for f in C.flag_fields(C.StageConfig)}
    if fv.epochs is not None:
        if fv.head_epochs or fv["finetune_epochs"].present or fv.stages:
            raise C.UserError("--epochs is for single-stage runs; with --head_epochs use --finetune_epochs, "
                              "or give every stage's epochs in --stages")
        stage["epochs"] = fv.epochs
    if fv.stages:
        stages = C.parse_stages(fv.stages)
    else:
        stages = C.simple_stages(head_epochs=fv.head_epochs, finetune_lr=fv.finetune_lr, **stage)
    values = {f.path: fv[f.flag].value for f in C.flag_fields(config_cls)}
    values[("model", "bn")] = _bn_policy(fv)
    return preflight.validate(C.from_flat(config_cls, values, stages=stages))


def config_from_args(args: list[str]) -> C.ExperimentConfig:
    """`launch.train` arguments (without the program name) -> a validated config.

    What `launch/ablate.py` uses to validate and compare trials before running them.

    Raises:
      UserError: an unknown flag or an invalid value.
    """
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        rest = fv(["launch.train", *args], known_only=True)[1:]
    except flags.Error as e:
        raise C.UserError(str(e)) from None
    # absl's own flags (--verbosity, --logtostderr, ...) are the process's, not the config's;
    # any other flag of the calling program (launch.ablate's --parallel) is not launch.train's.
    absl_flags = {f.name for m, fs in flags.FLAGS.flags_by_module_dict().items() if m.startswith("absl.")
                  for f in fs}
    for arg in rest:
        name = arg.lstrip("-").split("=", 1)[0]
        if not arg.startswith("-") or (name not in absl_flags and name.removeprefix("no") not in absl_flags):
            raise C.UserError(f"unknown launch.train flag or argument {arg!r}")
    return config_from_flags(fv)


def config_or_exit(argv, example_workdir: str) -> C.ExperimentConfig:
    """The command line's config (`--workdir` required); any user error exits 2, before
    TensorFlow is imported: a bad flag costs well under a second."""
    if len(argv) > 1:
        common.die(f"unexpected arguments {argv[1:]}; all options are --flags", common.EXIT_USER_ERROR)
    if not F.workdir:
        common.die(f"--workdir is required, e.g. --workdir={example_workdir}", common.EXIT_USER_ERROR)
    return config_from_flags()


def main(argv):
    config = config_or_exit(argv, "/tmp/run1")
    preflight.check(config, F.workdir, allow_config_change=F.allow_config_change,
                    chief=preflight.chief_of(config.train.strategy))

    with common.quiet_tensorflow_startup():
        from research.run import distribute
        distribute.split_cpu(config.train.cpu_devices)
        if config.train.strategy != "multi_worker":  # its collectives need an uninitialised context
            distribute.list_devices()
    from research.run import train as train_lib
    # Errors end in one line and their exit status (research/errors.py:exit_status_of).
    with train_lib.Preemption() as preemption:
        results = train_lib.train_and_evaluate(config, F.workdir, allow_config_change=F.allow_config_change,
                                               preemption=preemption)
    from research.run.run_state import count
    f = results["final"]
    test = f"test/accuracy {f['test/accuracy']:.4f}  " if "test/accuracy" in f else "(no test split)  "
    val = (f"val/accuracy {f['val/accuracy']:.4f}  val/loss {f['val/loss']:.4f}" if "val/accuracy" in f
           else "no validation (--refit)")
    print(f"\nfinal {test}{val}  ({count(results['epochs_run'], 'epoch')}, {results['wall_time_s']:.0f}s, "
          f"{results['images_per_second']:.0f} train images/s)")
    print(f"results: {F.workdir}/results.json")
    if F.export:
        print(f"model:   {F.workdir}/export (model.keras, saved_model, labels.json)")
    print(f"inspect: tensorboard --logdir {F.workdir}")


if __name__ == "__main__":
    define_flags(F)
    app.run(common.guarded(main), flags_parser=common.parse_flags_or_exit)
