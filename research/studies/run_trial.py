"""One trial's process: `python -m research.studies.run_trial SPEC.json`, where SPEC holds
`{"kind": "train" | "guide" | "probe", "out": DIR, "config": {...}}` (written by
research/studies/trials.py:run_config). An expected error ends in one `error:` line
and its exit status (research/errors.py), as a launcher's would.
"""

from __future__ import annotations

import json
import sys

from research.config import ExperimentConfig


def main(spec_path: str) -> int:
    """Runs one trial spec; an expected error is one `error:` line and its exit status."""
    from research import errors

    with open(spec_path) as f:
        spec = json.load(f)
    config = ExperimentConfig.from_dict(spec["config"])
    try:
        from research.run import distribute
        distribute.split_cpu(config.train.cpu_devices)  # before TensorFlow initialises its devices
        if spec["kind"] == "guide":
            from research.studies import guide
            guide.run(config, spec["out"])
        elif spec["kind"] == "probe":
            from research.studies.probe import run_probe
            run_probe(config, spec["out"])
        else:
            from research.run import train as train_lib
            with train_lib.Preemption() as preemption:
                train_lib.train_and_evaluate(config, spec["out"], preemption=preemption)
    except (Exception, KeyboardInterrupt) as e:
        status = errors.exit_status_of(e)
        if status is None:
            raise
        print(f"error: {errors.message_of(e)}", file=sys.stderr, flush=True)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
