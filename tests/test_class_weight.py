"""`--class_weight`: balanced weights as scikit-learn computes them, files, errors, and a run.

That the loop applies them exactly as `model.fit(class_weight=...)` is pinned in
`tests/test_loop_matches_fit.py`.
"""

import json

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from research.data import sources
from research.config import UserError
from tests.conftest import run_module


def test_balanced_equals_scikit_learn_and_files_name_classes(tmp_path):
    counts = [50, 31, 7, 2]
    labels = np.repeat(np.arange(4), counts)
    expected = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    np.testing.assert_allclose(sources.class_weights("balanced", list("abcd"), counts), expected)
    assert sources.class_weights("none", list("abcd"), counts) is None
    with pytest.raises(UserError, match="class 'c' has no training images"):
        sources.class_weights("balanced", list("abcd"), [3, 4, 0, 1])

    path = tmp_path / "w.json"
    path.write_text(json.dumps({"b": 2, "a": 0.5}))
    assert sources.class_weights(str(path), ["a", "b"], [1, 1]) == [0.5, 2.0]  # by name, in label order
    for content, message in (({"a": 1}, r"missing classes \['b'\]"), ({"a": 1, "b": 1, "z": 1}, r"unknown classes \['z'\]"),
                             ({"a": 1, "b": -1}, "positive number"), ([1, 2], "JSON object")):
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=message):
            sources.class_weights(str(path), ["a", "b"], [1, 1])


def test_a_run_records_its_class_weights(tmp_path):
    wd = tmp_path / "run"
    r = run_module("launch.train", f"--workdir={wd}", "--image_size=16", "--classes=0-2", "--epochs=1",
                   "--class_weight=balanced", "--noexport")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((wd / "results.json").read_text())
    counts = res["train_counts"]
    assert sum(counts) == res["num_train"] and len(counts) == 3
    expected = compute_class_weight("balanced", classes=np.arange(3), y=np.repeat(np.arange(3), counts))
    np.testing.assert_allclose(res["class_weights"], expected)
    assert "class weights: 0 " in r.stdout
    r = run_module("launch.train", f"--workdir={tmp_path / 'bad'}", "--class_weight=/no/such.json")
    assert r.returncode == 2 and "--class_weight='/no/such.json' is not valid" in r.stderr
