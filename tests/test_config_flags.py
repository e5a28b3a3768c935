"""The flags of launch.train are generated from the config's field declarations.

Walked here by hand (not through `flag_fields`), so a field the generator missed,
or a flag whose default drifted from its field's, fails. No TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
from absl import flags

from launch.train import config_from_args, config_from_flags, define_flags
from research import config as C


def _leaves(cls, prefix=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("flag") is False:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f


def _flag_values(cls=C.ExperimentConfig):
    fv = flags.FlagValues()
    define_flags(fv, cls)
    fv(["launch.train"])
    return fv


def test_every_leaf_field_has_its_flag_with_the_fields_default():
    fv = _flag_values()
    leaves = list(_leaves(C.ExperimentConfig)) + list(_leaves(C.StageConfig))
    assert len(leaves) > 60
    for path, f in leaves:
        name = f.metadata.get("flag") or f.name
        assert name in fv, f"{'.'.join(path)} has no flag --{name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert fv[name].default == default, (path, fv[name].default, default)
        assert fv[name].help, f"--{name} has no help"


def test_no_flags_is_the_default_config_and_each_flag_reaches_its_field():
    assert config_from_args([]) == C.validate(C.ExperimentConfig())
    got = config_from_args(["--data_threads=3", "--early_stopping_patience=2", "--restore_best_weights",
                            "--finetune_epochs=4", "--lr=0.01", "--head_epochs=2", "--early_stopping_baseline=0.5"])
    assert got.data.threads == 3 and got.train.early_stopping.patience == 2
    assert got.train.early_stopping.restore_best_weights and got.train.early_stopping.baseline == 0.5
    assert [(s.name, s.unfreeze, s.epochs, s.lr) for s in got.stages] == [("head", "none", 2, 0.01),
                                                                            ("finetune", "all", 4, 0.01)]


@dataclasses.dataclass(frozen=True)
class _NoisyTrain(C.TrainConfig):
    label_noise: float = C.opt(0.05, "Fraction of the training labels replaced at random.")


@dataclasses.dataclass(frozen=True)
class _NoisyExperiment(C.ExperimentConfig):
    train: _NoisyTrain = C.opt(None, "", factory=_NoisyTrain)


def test_a_field_added_in_a_test_appears_as_a_flag():
    fv = _flag_values(_NoisyExperiment)
    assert fv["label_noise"].default == 0.05 and "replaced at random" in fv["label_noise"].help
    fv(["launch.train", "--label_noise=0.2", "--seed=7"])
    config = config_from_flags(fv, _NoisyExperiment)
    assert isinstance(config.train, _NoisyTrain)
    assert config.train.label_noise == 0.2 and config.train.seed == 7
    assert config.to_dict()["train"]["label_noise"] == 0.2  # config.json records it


def test_resume_safe_fields_come_from_the_declarations():
    declared = {".".join(p) for p, f in _leaves(C.ExperimentConfig) if f.metadata.get("resume_safe")}
    assert declared == C.RESUME_SAFE_FIELDS
    assert {"train.steps_per_loop", "data.cache_dir", "train.export"} <= declared
    assert "train.seed" not in declared and "data.dataset" not in declared


def test_stage_keys_are_the_stage_fields():
    (stage,) = C.parse_stages("unfreeze=top:2 epochs=3 lr=1e-4 warmup=1 gradual_every=1 patience=2")
    assert (stage.warmup_epochs, stage.gradual_every, stage.patience) == (1.0, 1, 2)
    with pytest.raises(C.UserError, match="allowed keys: name, unfreeze, epochs"):
        C.parse_stages("unfreez=top:2")
