"""Trials: a sweep's grid expanded into configs, validated together, run resumably.

A sweep root holds one workdir per trial under `trials/`. Every trial's config
is built and validated before the first one runs (a bad sweep value is a user
error, not a failed trial 90 s later). A trial is finished when its
`results.json` exists and its `config.json` equals the config its flags give
now: re-running a sweep skips it. A trial run before with other settings is
refused, naming the difference, unless `rerun` (then it starts again from
scratch). An unfinished trial is simply started again, and resumes from its
checkpoint. A failed trial leaves `error.txt` and a row marked failed; the
others still run.

Each trial runs in its own process (a normal workdir, resumable and killable on
its own), handed its config: `python -m research.studies.run_trial TRIAL.json`.
`make_config` turns a trial's flags into its validated `ExperimentConfig`; the
launcher passes its own flag parser.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from research.config import ExperimentConfig, UserError, config_diff
from research.errors import EXIT_INTERRUPTED

SEED_KEY = "seed"
MakeConfig = Callable[[list[str]], ExperimentConfig]


@dataclass
class Trial:
    """One run of a config.

    Attributes:
      name: directory name under `trials/` (stable: derived from the values).
      values: the swept values, `{flag: value}` (shown in tables and HParams).
      flags: every `--flag=value` passed to the run (base flags, then values).
      group: rows with the same group are aggregated over seeds.
      kind: what runs the config: `train` (`train_and_evaluate`) or `guide` (the Keras
        guide's `model.fit` recipe, research/studies/guide.py).
      config: the validated config its flags give (set by `prepare`).
      stage_epochs: each stage's epochs, replacing what the flags give (a refit trains
        for the epochs cross-validation chose: research/studies/cv.py).
    """

    name: str
    values: dict[str, str]
    flags: list[str]
    group: str = ""
    kind: str = "train"
    config: ExperimentConfig | None = None
    stage_epochs: tuple[int, ...] | None = None


def parse_sweep(items: list[str]) -> list[tuple[str, list[str]]]:
    """Parses `--sweep=key:v1,v2` items (`;` separates values that contain commas).

    Raises:
      UserError: malformed item or an empty value list.
    """
    out = []
    for item in items:
        key, sep, values = item.partition(":")
        key = key.strip().lstrip("-")
        if not sep or not re.fullmatch(r"[a-z_0-9]+", key):
            raise UserError(f"--sweep={item!r} is not KEY:V1,V2,... (for example unfreeze:none,top:1,all)")
        parts = values.split(";") if ";" in values else values.split(",")
        parts = [p.strip() for p in parts if p.strip()]
        if not parts:
            raise UserError(f"--sweep={item!r} lists no values")
        out.append((key, parts))
    keys = [k for k, _ in out]
    if len(set(keys)) != len(keys):
        raise UserError(f"--sweep names a flag twice: {keys}")
    return out


def trial_name(values: dict[str, str]) -> str:
    return "__".join(f"{k}-{re.sub(r'[^A-Za-z0-9.+-]', '_', v)}" for k, v in values.items()) or "trial"


def expand(sweep: list[tuple[str, list[str]]], base_flags: list[str]) -> list[Trial]:
    """The cartesian product of the swept values, in the order given."""
    keys = [k for k, _ in sweep]
    trials = []
    for combo in itertools.product(*[v for _, v in sweep]):
        values = dict(zip(keys, combo))
        group = trial_name({k: v for k, v in values.items() if k != SEED_KEY})
        trials.append(Trial(trial_name(values), values, list(base_flags) + [f"--{k}={v}" for k, v in values.items()],
                            group))
    return trials


# --- running --------------------------------------------------------------------------

def trial_dir(root: str, trial: Trial) -> str:
    return os.path.join(root, "trials", trial.name)


def is_finished(root: str, trial: Trial) -> bool:
    return os.path.exists(os.path.join(trial_dir(root, trial), "results.json"))


def prepare(root: str, trials: list[Trial], make_config: MakeConfig, *, rerun: bool = False, log=print) -> None:
    """Validates every trial before any runs, and refuses (or clears, with `rerun`) stale ones.

    Raises:
      UserError: a trial whose flags are invalid, or one that ran before with a
        config other than what its flags give now (without `rerun`).
    """
    configs = {}
    # One image check and one disk cache for the whole sweep, not one per trial.
    cache_dir = os.path.join(os.path.abspath(root), "cache")
    for t in trials:
        try:
            config = make_config(t.flags)
            if t.stage_epochs is not None:
                from research.config import validate
                config = validate(dataclasses.replace(config, stages=tuple(
                    dataclasses.replace(s, epochs=e) for s, e in zip(config.stages, t.stage_epochs, strict=True))))
            if not config.data.cache_dir:
                config = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir=cache_dir))
            if t.kind == "guide":
                from research.studies import guide  # imports Keras: only for the guide's trials
                guide.check(config)
        except UserError as e:
            raise UserError(f"trial {t.name}: {e}") from None
        configs[t.name] = t.config = config
    stale = []
    for t in trials:
        path = os.path.join(trial_dir(root, t), "config.json")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            diff = config_diff(old, configs[t.name].to_dict())
            if "test" not in old.get("data", {}):
                # Its splits differ (no test slice was carved) though no field reads differently.
                diff.append("data.test: ran before runs had a test split")
            if diff:
                stale.append((t, diff))
    if stale and not rerun:
        shown = "; ".join(f"{t.name}: {', '.join(d)}" for t, d in stale[:4])
        more = f"; and {len(stale) - 4} more" if len(stale) > 4 else ""
        raise UserError(f"{len(stale)} trial(s) in {root} ran with other settings than these flags give now "
                        f"({shown}{more}); use another --root, or pass --rerun to run them again from scratch")
    for t, _ in stale:
        log(f"[ablate] {t.name}: settings changed, running it again from scratch")
        shutil.rmtree(trial_dir(root, t))


# The run's own lines (research/run/controller.py) that say where it is.
EPOCH_LINE = re.compile(r"^stage (\S+) epoch (\d+)/(\d+)$")
VAL_LINE = re.compile(r"^  val/loss (\S+)  val/accuracy (\S+)")
PROGRESS_EVERY_S = 15.0  # at most one progress line per trial this often


class Follower:
    """Reads a trial's `stdout.log` as it grows and tells each epoch it finishes.

    Epochs are counted over the whole run (a stage's first epoch follows the last
    stage's), so a resumed trial continues its count.
    """

    def __init__(self, path: str, config: ExperimentConfig):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        starts = itertools.accumulate([0] + [s.epochs for s in config.stages])
        self.first = {s.name: start for s, start in zip(config.stages, starts)}
        self.total = sum(s.epochs for s in config.stages)
        self.current, self.rest = None, ""

    def poll(self) -> str | None:
        """The newest epoch finished since the last call (`epoch 5/16 (finetune 1/8), val/accuracy 0.8367`),
        or None."""
        try:
            with open(self.path) as f:
                f.seek(self.offset)
                text = f.read()
                self.offset = f.tell()
        except OSError:
            return None
        lines = (self.rest + text).split("\n")
        self.rest, message = lines.pop(), None
        for line in lines:
            m = EPOCH_LINE.match(line)
            if m and m.group(1) in self.first:
                self.current = m.groups()
            v = VAL_LINE.match(line)
            if v and self.current:
                stage, i, n = self.current
                message = (f"epoch {self.first[stage] + int(i)}/{self.total} ({stage} {i}/{n}), "
                           f"val/accuracy {v.group(2)}")
        return message


def run_config(kind: str, config: ExperimentConfig, out_dir: str, spec_path: str, *,
               progress: Callable[[str], None] | None = None) -> int:
    """Runs a config in a child process (`python -m research.studies.run_trial SPEC`), its
    output appended to `out_dir/stdout.log` and `stderr.log`; returns its exit status.

    The child is handed the config itself (written to `spec_path`), not flags: what
    the parent validated and compared is exactly what runs. `progress` is told the
    epochs the child finishes, at most every `PROGRESS_EVERY_S` seconds.
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(spec_path, "w") as f:
        json.dump({"kind": kind, "out": out_dir, "config": config.to_dict()}, f, indent=1)
    log_path = os.path.join(out_dir, "stdout.log")
    follower = Follower(log_path, config) if progress else None
    with open(log_path, "a") as out, open(os.path.join(out_dir, "stderr.log"), "a") as err:
        proc = subprocess.Popen([sys.executable, "-m", "research.studies.run_trial", spec_path], stdout=out,
                                stderr=err, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
        try:
            rc = None
            while rc is None:
                try:
                    rc = proc.wait(timeout=PROGRESS_EVERY_S if follower else None)
                except subprocess.TimeoutExpired:
                    pass
                message = follower and follower.poll()  # once more after the exit: the last epochs
                if message:
                    progress(message)
            return rc
        except KeyboardInterrupt:
            # Ctrl-C reached the trial too: it finishes its steps and saves (subprocess.call
            # would kill it a quarter of a second later). Not reached (a signal to this
            # process alone): it is asked the same way.
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait()
            raise


def run_trial(root: str, trial: Trial, *, log=print, where: str = "") -> dict:
    """Runs (or resumes, or skips) one trial in a subprocess, logging its epochs as they end.

    Args:
      where: said when it starts (`3 of 18; about 6 min left`).

    Returns:
      `{"status": "done"|"skipped"|"failed", ...}`.
    """
    wd = trial_dir(root, trial)
    if is_finished(root, trial):
        return {"status": "skipped"}
    os.makedirs(wd, exist_ok=True)
    err_path = os.path.join(wd, "error.txt")
    if os.path.exists(err_path):
        os.remove(err_path)
    log(f"[ablate] running {trial.name}{f' ({where})' if where else ''}; its output: {os.path.join(wd, 'stdout.log')}")
    t0 = time.time()
    rc = run_config(trial.kind, trial.config, wd, os.path.join(wd, "trial.json"),
                    progress=lambda message: log(f"[ablate]   {trial.name}: {message}"))
    if rc == EXIT_INTERRUPTED:
        # The trial saved and stopped on a signal (Ctrl-C, a preemption's SIGTERM), whether or
        # not this process got one too: the sweep stops with it, to be resumed the same way.
        raise KeyboardInterrupt
    if rc != 0 or not is_finished(root, trial):
        tail = ""
        with open(os.path.join(wd, "stderr.log")) as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        tail = (errors or lines or ["(no output)"])[-1]
        with open(err_path, "w") as f:
            f.write(f"exit status {rc}\n{tail}\n")
        log(f"[ablate] {trial.name} FAILED (exit {rc}): {tail}")
        return {"status": "failed", "returncode": rc, "error": tail}
    log(f"[ablate] {trial.name} done in {time.time() - t0:.0f}s")
    return {"status": "done"}


def run_all(root: str, trials: list[Trial], *, parallel: int = 1, log=print) -> dict[str, dict]:
    """Runs every trial (`parallel` subprocesses at a time); failures do not stop the others."""
    os.makedirs(os.path.join(root, "trials"), exist_ok=True)
    done = [t.name for t in trials if is_finished(root, t)]
    if done:
        log(f"[ablate] {len(done)} of {len(trials)} trial(s) already finished with these settings: reused")
    todo = [t for t in trials if t.name not in done]
    durations: list[float] = []

    def one(i: int, trial: Trial) -> dict:
        where = f"{i + 1} of {len(todo)} to run"
        if durations:  # the trials this invocation finished so far
            left = sum(durations) / len(durations) * (len(todo) - i) / parallel
            where += f"; about {left / 60:.0f} min left" if left >= 90 else f"; about {left:.0f} s left"
        t0 = time.time()
        result = run_trial(root, trial, log=log, where=where)
        if result["status"] == "done":
            durations.append(time.time() - t0)
        return result

    results = {name: {"status": "skipped"} for name in done}
    if parallel <= 1:
        results.update({t.name: one(i, t) for i, t in enumerate(todo)})
    else:
        with ThreadPoolExecutor(parallel) as pool:
            futures = {t.name: pool.submit(one, i, t) for i, t in enumerate(todo)}
            results.update({name: f.result() for name, f in futures.items()})
    return {t.name: results[t.name] for t in trials}
