"""Shared test helpers: quiet TensorFlow, the shared real data, launcher subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("RESEARCH_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))


def shared_path(*parts: str) -> str:
    """A path under ../shared/data, or skip the test with the reason."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (set RESEARCH_SHARED_DATA to the shared data folder)")
    return path


def run_module(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` from the project root and captures output."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def tiny_folder(tmp_path):
    """A folder dataset of real digits written as PNG/JPEG files (3 classes, names with spaces)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    root = tmp_path / "imgs"
    for c in (0, 1, 2):
        (root / f"class {c}").mkdir(parents=True)
        idx = np.flatnonzero(d.target == c)[:30]
        for j, i in enumerate(idx):
            img = (d.images[i] * 255 / 16).astype("uint8")
            ext = "png" if j % 2 else "jpg"
            Image.fromarray(img).convert("RGB").resize((20 + j % 5, 16)).save(root / f"class {c}" / f"img {j}.{ext}")
    return root


def write_digit_folders(root, plan: dict) -> None:
    """Digits 0-2 as class folders, one sub-folder per split of `plan` ({split: slice of each
    class's images}), under `root/real`, and under `root/scrambled` the same with every test
    image filed under the wrong class: the fixture of the checks that no decision reads test."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in range(3):
        idx = np.flatnonzero(d.target == c)
        for split, sl in plan.items():
            for copy, label in (("real", c), ("scrambled", (c + 1) % 3 if split == "test" else c)):
                out = root / copy / split / f"digit{label}"
                out.mkdir(parents=True, exist_ok=True)
                for i in idx[sl]:
                    Image.fromarray((d.images[i] * 255 / 16).astype("uint8")).convert("RGB").save(out / f"{i}.png")
