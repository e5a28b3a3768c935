"""The experiment's config: frozen dataclasses, their flags and their validation.

A config is built once (by `launch/train.py` from flags, or by a test directly),
validated, saved as `config.json` in the workdir, and passed read-only to the
library. Nothing in `research/` reads absl flags.

  sections.py  the dataclasses: each field declared once (default, help, flag name)
  stage.py     `StageConfig`, one stage's settings (a run has one or more)
  declare.py   `opt`, how a field is declared, and the check of listed values
  specs.py     `--dataset` and unfreeze specs, each parsed in one place (`DatasetRef`, `UnfreezeSpec`)
  fields.py    what is derived from the declarations: flags, `--stages`, resume diffs
  validate.py  `validate`: the sections' own checks, then those across sections
"""

from research.config.fields import (RESUME_SAFE_FIELDS, FlagField, config_diff, flag_fields, from_flat,
                                    parse_stages, simple_stages)
from research.config.sections import (BN_POLICIES, CACHE_MODES, ES_MODES, JIT, MONITORS, OPTIMIZERS, PRECISIONS,
                                      SAMPLERS, SCHEDULES, STRATEGIES, TEST_SOURCES, AugmentConfig,
                                      DataConfig, EarlyStoppingConfig, ExperimentConfig, ModelConfig, StageConfig,
                                      TrainConfig, opt, writable_dir)
from research.config.specs import SPEC_FORMS, DatasetRef, UnfreezeSpec
from research.config.validate import resolve_paths, validate
from research.errors import UserError

__all__ = ["AugmentConfig", "BN_POLICIES", "CACHE_MODES", "DataConfig", "DatasetRef", "ES_MODES", "EarlyStoppingConfig",
           "ExperimentConfig", "FlagField", "JIT", "MONITORS", "ModelConfig", "OPTIMIZERS", "PRECISIONS",
           "RESUME_SAFE_FIELDS", "SAMPLERS", "SCHEDULES", "SPEC_FORMS", "STRATEGIES", "StageConfig", "TEST_SOURCES",
           "TrainConfig", "UnfreezeSpec", "UserError", "config_diff", "flag_fields", "from_flat", "opt", "parse_stages",
           "resolve_paths", "simple_stages", "validate", "writable_dir"]
