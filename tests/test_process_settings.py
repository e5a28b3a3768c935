"""Process-wide settings do not leak from one run into the next in the same process.

A run in a process that already ran another one (another precision, seed and
determinism) must give what the same run gives in a process of its own: the
same history, bit for bit, and the same variable paths in `trainable.json`.
"""

import json
import subprocess
import sys
import textwrap

from tests.conftest import ROOT

SCRIPT = textwrap.dedent('''
    import json, sys
    from tensorflow.python.framework import config as tf_config
    import keras
    from research.config import DataConfig, ExperimentConfig, ModelConfig, StageConfig, TrainConfig
    from research.run import train as train_lib

    def cfg(seed, precision, deterministic, ema=0.0):
        return ExperimentConfig(
            data=DataConfig(image_size=16, classes="0-4", batch_size=32),
            model=ModelConfig(dropout=0.3),
            train=TrainConfig(seed=seed, precision=precision, deterministic=deterministic, steps_per_loop=5,
                              export=False, ema_decay=ema),
            stages=(StageConfig(name="head", unfreeze="none", epochs=1, lr=3e-3),
                    StageConfig(name="ft", unfreeze="top:2", epochs=1, lr=1e-3)))

    out = sys.argv[1]
    runs = sys.argv[2:]
    for i, name in enumerate(runs):
        config = {"other": cfg(5, "mixed_bfloat16", True, ema=0.9), "ref": cfg(3, "float32", True),
                  "loose": cfg(3, "float32", False)}[name]
        train_lib.train_and_evaluate(config, f"{out}/{i}-{name}", verbose=False)
    print(json.dumps({"determinism": tf_config.is_op_determinism_enabled(),
                      "policy": keras.mixed_precision.global_policy().name}))
''')


def _run(tmp_path, name, *runs):
    script = tmp_path / "runs.py"
    script.write_text(SCRIPT)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / name), *runs], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT,
                                                    "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_second_run_in_one_process_equals_a_run_in_its_own(tmp_path):
    _run(tmp_path, "alone", "ref")
    state = _run(tmp_path, "after", "other", "ref", "loose")
    # The last run asked for neither determinism nor mixed precision: it has neither.
    assert state == {"determinism": False, "policy": "float32"}
    alone = json.loads((tmp_path / "alone" / "0-ref" / "results.json").read_text())
    after = json.loads((tmp_path / "after" / "1-ref" / "results.json").read_text())
    keys = [k for k in alone["history"][0] if "loss" in k or "accuracy" in k]
    assert len(keys) >= 4
    assert [[h[k] for k in keys] for h in alone["history"]] == [[h[k] for k in keys] for h in after["history"]]
    assert alone["final"] == after["final"]
    paths = [json.loads((tmp_path / d / "trainable.json").read_text()) for d in ("alone/0-ref", "after/1-ref")]
    assert [r["variables"] for r in paths[0]] == [r["variables"] for r in paths[1]]
