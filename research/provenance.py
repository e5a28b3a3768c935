"""What produced a result: the code, the libraries, the machine, the command, the time.

A number in a table must be traceable to the code that made it. Every run records
`provenance()` for each process that worked on it (a resumed run has several, and
they may differ: resuming under other code is allowed and shows); `launch.evaluate`
and `launch.export` record their own in their reports; sweep tables name the code of
their trials and warn when one table mixes several.

The code version is the git commit of the checkout the `research` package was
imported from, whether its code differs from it (`dirty`: changed or new files under
`CODE_PATHS`; documentation does not count) and a hash of that difference, new files'
contents included (two dirty runs with the same hash ran the same code); outside a
checkout, the installed package's version.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import socket
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "research-finetune"
CODE_PATHS = ("research", "launch", "benchmarks", "pyproject.toml")


def _git(root: str, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.decode(errors="replace") if r.returncode == 0 else None


def code_version(root: str = ROOT) -> dict[str, Any]:
    """`{"commit", "dirty", "diff_sha256", "version"}`; `commit` is None outside a git checkout."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            pkg = version(PACKAGE)
        except PackageNotFoundError:
            pkg = None
    except ImportError:  # pragma: no cover
        pkg = None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "diff_sha256": None, "version": pkg}
    h, dirty = hashlib.sha256(), False
    diff = _git(root, "diff", "HEAD", "--no-color", "--no-ext-diff", "--", *CODE_PATHS) or ""
    if diff:
        h.update(diff.encode())
        dirty = True
    new = (_git(root, "ls-files", "--others", "--exclude-standard", "--", *CODE_PATHS) or "").split()
    for name in sorted(new):  # a new module not yet added to git is code too
        try:
            with open(os.path.join(root, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
            dirty = True
        except OSError:
            pass
    return {"commit": commit.strip(), "dirty": dirty, "diff_sha256": h.hexdigest() if dirty else None,
            "version": pkg}


def short(code: dict[str, Any] | None) -> str:
    """`a1b2c3d4e5` or `a1b2c3d4e5+dirty:0f1e2d3c` (the diff's hash), `v0.1.0`, or `unknown`."""
    if not code:
        return "unknown"
    if code.get("commit"):
        return code["commit"][:10] + (f"+dirty:{code['diff_sha256'][:8]}" if code.get("dirty") else "")
    return f"v{code['version']}" if code.get("version") else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def devices(strategy=None, precision: str | None = None) -> dict[str, Any]:
    """The CPU, the GPUs TensorFlow sees (when it is loaded), replicas and precision."""
    out: dict[str, Any] = {"cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        gpus = []
        for d in tf.config.list_physical_devices("GPU"):
            try:
                gpus.append(tf.config.experimental.get_device_details(d).get("device_name", d.name))
            except (ValueError, RuntimeError):
                gpus.append(d.name)
        out["gpus"] = gpus
    if strategy is not None:
        out["replicas"] = strategy.num_replicas_in_sync
        out["strategy"] = type(strategy).__name__
    if precision is not None:
        out["precision"] = precision
    return out


def versions() -> dict[str, str | None]:
    """Python's and the libraries' (those already imported; TensorFlow is not started for this)."""
    out = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "numpy"):
        mod = sys.modules.get(name)
        out[name] = getattr(mod, "__version__", None) if mod is not None else None
    return out


def peak_memory_mb() -> dict[str, float]:
    """The process's peak memory so far: host RSS, and each GPU's peak allocation where
    TensorFlow runs on GPUs."""
    import resource

    out = {"host_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # Linux: KiB
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        for d in tf.config.list_logical_devices("GPU"):
            out[d.name] = round(tf.config.experimental.get_memory_info(d.name)["peak"] / 2**20, 1)
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def provenance(strategy=None, precision: str | None = None) -> dict[str, Any]:
    """Everything above, for the current process, with its start time (`started`)."""
    return {"command": list(sys.argv), "cwd": os.getcwd(), "code": code_version(), "versions": versions(),
            "devices": devices(strategy, precision), "host": socket.gethostname(), "started": now()}
