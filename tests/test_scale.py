"""Datasets that outgrow memory: the cache modes, the remembered image check, TFRecord
shards (`launch.convert`, `tfrecord:`), worker file sharding and resume (issue 16)."""

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import jpeg_folder
from research.data import convert, pipeline as data, sources
from research.data import folders
from research.config import AugmentConfig, DataConfig, ExperimentConfig, UserError
from tests.conftest import ROOT, run_module

AUG = AugmentConfig(horizontal_flip=True, rotation=10.0, zoom=0.1)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "jpegs"
    jpeg_folder.write(str(root), 400, size=24, classes=4)
    return root


@pytest.fixture(scope="module")
def shards(jpegs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "out"
    convert.convert(DataConfig(dataset=f"folder:{jpegs}"), str(out), shard_mb=0.01, log=lambda *_: None)
    return out


def _pipeline(dataset, mode, cache_dir, *, size=16, batch=16, **source_kw):
    cfg = DataConfig(dataset=dataset, batch_size=batch)
    src = sources.load_source(cfg, size, cache_dir=str(cache_dir), **source_kw)
    p = data.Pipeline(src, batch_size=batch, preprocess=lambda x: x, augment=AUG, seed=3, cache=mode,
                      cache_dir=str(cache_dir), shuffle_buffer=64)
    p.prepare()
    return p


def _batches(p, epochs=2):
    train = [x.numpy() for x, _ in p.train_stream(0, epochs)]
    train_labels = [y.numpy() for _, y in p.train_stream(0, epochs, augment=False)]
    val = [(x.numpy(), y.numpy()) for x, y in p.val_dataset()]
    return train, train_labels, val


def _same(a, b):
    assert len(a[0]) == len(b[0]) > 0 and len(a[2]) == len(b[2]) > 0
    for x, y in zip(a[0], b[0]):
        assert np.array_equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert np.array_equal(x, y)
    for (x, y), (u, v) in zip(a[2], b[2]):
        assert np.array_equal(x, u) and np.array_equal(y, v)


@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_every_cache_mode_gives_the_batches_of_memory(tmp_path, jpegs, shards, kind):
    dataset = f"folder:{jpegs}" if kind == "folder" else f"tfrecord:{shards}"
    ref = _batches(_pipeline(dataset, "memory", tmp_path / "m"))
    for mode in ("disk", "none"):
        _same(ref, _batches(_pipeline(dataset, mode, tmp_path / mode)))
    # A second pipeline on the same data reads the disk cache, not the images: with every
    # image source inverted behind the same fingerprint it still yields the originals.
    p = _pipeline(dataset, "disk", tmp_path / "disk")
    src = dataclasses.replace(p.source, train=p.source.train.map(lambda x, y: (255 - x, y)),
                              val=p.source.val.map(lambda x, y: (255 - x, y)))
    reread = data.Pipeline(src, batch_size=16, preprocess=lambda x: x, augment=AUG, seed=3, cache="disk",
                           cache_dir=str(tmp_path / "disk"), shuffle_buffer=64)
    reread.prepare()
    _same(ref, _batches(reread))
    names = sorted(os.listdir(tmp_path / "disk"))
    assert [n.split("-")[0] for n in names if not n.endswith(".json")] == ["train", "val"], names


def test_a_disk_cache_left_half_written_by_a_killed_run_is_rewritten(tmp_path, jpegs):
    p = _pipeline(f"folder:{jpegs}", "memory", tmp_path / "c")
    dead = f"{p._disk_path('train')}.tmp-{socket.gethostname()}-999999"  # a writer on this host, gone
    os.makedirs(dead)
    open(os.path.join(dead, "images.data-00000-of-00001"), "wb").write(b"half")
    fresh = _pipeline(f"folder:{jpegs}", "disk", tmp_path / "c")
    assert not os.path.exists(dead)
    assert os.path.exists(os.path.join(fresh._disk_path("train"), "images.index"))
    _same(_batches(p), _batches(fresh))


def test_a_disk_cache_serves_the_new_pixels_of_an_image_rewritten_in_place(tmp_path, jpegs):
    from PIL import Image

    folder = tmp_path / "imgs"
    shutil.copytree(jpegs, folder)
    before = _batches(_pipeline(f"folder:{folder}", "disk", tmp_path / "cache"))
    for path in sorted(folder.glob("*/*.jpg"))[:5]:  # new pixels, a new size, a later modification time
        st = os.stat(path)
        Image.fromarray(255 - np.asarray(Image.open(path))).save(path, quality=100)
        os.utime(path, (st.st_atime, st.st_mtime + 60))
        assert os.stat(path).st_size != st.st_size
    expected = _batches(_pipeline(f"folder:{folder}", "memory", tmp_path / "memory"))
    with pytest.raises(AssertionError):
        _same(before, expected)  # the rewritten images are among those the batches show
    _same(expected, _batches(_pipeline(f"folder:{folder}", "disk", tmp_path / "cache")))


def test_auto_picks_disk_when_the_ram_is_small():
    # 10,000 images of 224 px are 1.4 GiB decoded.
    assert data.choose_cache("auto", 10_000, 224, available_bytes=64 * 2**30)[0] == "memory"
    mode, why = data.choose_cache("auto", 10_000, 224, available_bytes=4 * 2**30)
    assert mode == "disk" and "1.4 GiB" in why and "35%" in why
    assert data.choose_cache("memory", 10_000, 224, available_bytes=1)[0] == "memory"  # as asked


def _hashes(ds):
    return sorted((int(y), hashlib.sha1(x.tobytes()).hexdigest()) for x, y in ds.as_numpy_iterator())


def test_convert_then_tfrecord_gives_the_images_and_labels_of_the_folder(tmp_path, jpegs, shards):
    folder = sources.load_source(DataConfig(dataset=f"folder:{jpegs}"), 24)
    records = sources.load_source(DataConfig(dataset=f"tfrecord:{shards}"), 24)
    assert records.class_names == folder.class_names
    assert records.train_counts == folder.train_counts
    for split in ("train", "val", "test"):
        a, b = _hashes(getattr(folder, split)), _hashes(getattr(records, split))
        assert a == b and len(a) == {"train": 280, "val": 80, "test": 40}[split]
    m = json.loads((shards / "manifest.json").read_text())
    assert len(m["splits"]["train"]["files"]) > 2 and m["splits"]["train"]["count"] == 280
    assert sum(f["count"] for f in m["splits"]["train"]["files"]) == 280
    # Resized at conversion: the same labels, images of the side asked for.
    small = tmp_path / "small"
    convert.convert(DataConfig(dataset=f"folder:{jpegs}"), str(small), image_size=12, log=lambda *_: None)
    resized = sources.load_source(DataConfig(dataset=f"tfrecord:{small}", classes="1,3"), 12)
    assert resized.num_train == folder.train_counts[1] + folder.train_counts[3]
    labels = [int(y) for _, y in resized.train.as_numpy_iterator()]
    assert sorted(set(labels)) == [0, 1] and len(labels) == resized.num_train
    # Raw pixels at the model's side: exactly the folder's images at that side, nothing to decode.
    raw = tmp_path / "raw"
    convert.convert(DataConfig(dataset=f"folder:{jpegs}"), str(raw), image_size=16, encoding="raw", log=lambda *_: None)
    at16 = sources.load_source(DataConfig(dataset=f"folder:{jpegs}"), 16)
    for split in ("train", "val", "test"):
        assert _hashes(getattr(at16, split)) == _hashes(getattr(sources.load_source(
            DataConfig(dataset=f"tfrecord:{raw}"), 16), split))
    with pytest.raises(UserError, match="--encoding=raw"):
        convert.convert(DataConfig(dataset=f"folder:{jpegs}"), str(tmp_path / "x"), encoding="raw")


def _write_bad(folder):
    bad = folder / "class01" / "zz-truncated.jpg"
    data_ = (folder / "class01" / "0000001.jpg").read_bytes()
    bad.write_bytes(data_[: len(data_) // 2])
    return bad


def test_a_corrupt_jpeg_is_named_or_skipped_under_every_mode_and_in_convert(tmp_path, jpegs, monkeypatch):
    import shutil
    folder = tmp_path / "f"
    shutil.copytree(jpegs, folder)
    bad = _write_bad(folder)
    for mode in ("memory", "disk", "none"):
        with pytest.raises(UserError, match="zz-truncated.jpg"):
            _pipeline(f"folder:{folder}", mode, tmp_path / mode)
    with pytest.raises(UserError, match="zz-truncated.jpg"):
        convert.convert(DataConfig(dataset=f"folder:{folder}"), str(tmp_path / "out"), log=lambda *_: None)
    assert not (tmp_path / "out").exists()
    for mode in ("memory", "disk", "none"):
        cfg = DataConfig(dataset=f"folder:{folder}", batch_size=16, skip_bad_images=True)
        src = sources.load_source(cfg, 16, cache_dir=str(tmp_path / mode))
        assert src.skipped == [str(bad)]
        p = data.Pipeline(src, batch_size=16, preprocess=lambda x: x, augment=AUG, cache=mode,
                          cache_dir=str(tmp_path / mode))
        p.prepare()
        assert len(list(p.train_stream(0, 1))) == p.steps_per_epoch
    m = convert.convert(dataclasses.replace(cfg, skip_bad_images=True), str(tmp_path / "out"), log=lambda *_: None)
    assert m["skipped"] == [str(bad)]
    assert sources.load_source(DataConfig(dataset=f"tfrecord:{tmp_path / 'out'}"), 16).skipped == [str(bad)]

    # Checked once: a second load opens no image; a file replaced since is checked again.
    opened = []
    real = folders._readable
    monkeypatch.setattr(folders, "_readable", lambda p: opened.append(p) or real(p))
    sources.load_source(cfg, 16, cache_dir=str(tmp_path / "memory"))
    assert opened == []
    bad.write_bytes((folder / "class01" / "0000005.jpg").read_bytes())
    src = sources.load_source(cfg, 16, cache_dir=str(tmp_path / "memory"))
    assert opened == [str(bad)] and src.skipped == []


def test_a_run_checks_its_images_once_and_records_the_skipped_ones(tmp_path, jpegs):
    import shutil
    folder = tmp_path / "f"
    shutil.copytree(jpegs, folder)
    bad = _write_bad(folder)
    wd = tmp_path / "run"
    args = [f"--workdir={wd}", f"--dataset=folder:{folder}", "--backbone=small_cnn", "--image_size=16",
            "--finetune_epochs=1", "--batch_size=16", "--cache=disk"]
    r = run_module("launch.train", *args)
    assert r.returncode == 2 and str(bad) in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not wd.exists()  # a user error writes nothing, not even the check's results
    r = run_module("launch.train", *args, "--skip_bad_images")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cache: disk in" in r.stdout
    assert json.loads((wd / "results.json").read_text())["skipped_images"] == [str(bad)]
    checked = json.loads((wd / "cache" / "images.json").read_text())["images"]
    assert checked[str(bad)][2] and len(checked) == 401


def test_a_sweep_checks_and_caches_the_images_once_for_all_its_trials(tmp_path, jpegs):
    root = tmp_path / "sweep"
    args = ["launch.ablate", f"--root={root}", "--sweep=seed:0,1", "--", f"--dataset=folder:{jpegs}",
            "--backbone=small_cnn", "--image_size=16", "--batch_size=16", "--finetune_epochs=1", "--cache=disk",
            "--verbosity=0"]
    r = run_module(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    cached = sorted(n.split("-")[0] for n in os.listdir(root / "cache") if not n.endswith(".json"))
    assert cached == ["train", "val"]  # one disk cache, written by the first trial, read by the second
    trials = sorted(t for t in os.listdir(root / "trials") if (root / "trials" / t).is_dir())
    assert len(trials) == 2 and not any((root / "trials" / t / "cache").exists() for t in trials)
    # A sweep of seeds only is one row: its mean and interval, in the table, summary.csv and the plot.
    assert "| all | 2 |" in (root / "results.md").read_text()
    assert (root / "summary.csv").exists() and (root / "results.png").exists()
    again = run_module(*args)  # the shared cache directory does not make the trials stale
    assert again.returncode == 0 and "running" not in again.stdout, again.stdout[-2000:]


# --- Multi-worker: each worker reads its own files ---------------------------------------------

@pytest.mark.parametrize("shard_mb", [0.01, 1000], ids=["many-files", "fewer-files-than-workers"])
def test_worker_shares_are_disjoint_and_cover_the_split_once(tmp_path, jpegs, shard_mb):
    out = tmp_path / "shards"
    convert.convert(DataConfig(dataset=f"folder:{jpegs}"), str(out), shard_mb=shard_mb, log=lambda *_: None)
    files = json.loads((out / "manifest.json").read_text())["splits"]["train"]["files"]
    assert (len(files) >= 3) == (shard_mb < 1)
    cfg = DataConfig(dataset=f"tfrecord:{out}", classes="0,1,3")
    shares = [sources.load_source(cfg, 16, worker=(i, 3)) for i in range(3)]
    seen = [[h for _, h in _hashes(s.train)] for s in shares]
    whole = [h for _, h in _hashes(sources.load_source(cfg, 16).train)]
    assert sorted(sum(seen, [])) == sorted(whole) and len(set(whole)) == len(whole) == 210
    assert [s.num_train for s in shares] == [len(h) for h in seen]
    assert all(s.min_worker_train == min(map(len, seen)) and s.shard == (i, 3) for i, s in enumerate(shares))


def test_sharded_sources_refuse_a_batch_no_worker_can_fill_and_evaluate_as_before(shards):
    from research.config import validate
    cfg = DataConfig(dataset=f"tfrecord:{shards}", batch_size=400)
    for i in range(2):  # the same decision on every worker, from the smallest share
        with pytest.raises(UserError, match="smallest worker's share"):
            sources.load_source(cfg, 16, worker=(i, 2))
    src = sources.load_source(dataclasses.replace(cfg, batch_size=16), 16, worker=(1, 2))
    assert src.split_train == 280 and src.num_train < 280
    p = data.Pipeline(src, batch_size=16, preprocess=lambda x: x, augment=AUG, cache="none", replicas=2)
    policy = tf.data.experimental.AutoShardPolicy
    assert p.train_stream(0, 1).options().experimental_distribute.auto_shard_policy == policy.OFF
    assert p.val_dataset().options().experimental_distribute.auto_shard_policy == policy.DATA
    with pytest.raises(UserError, match="--cache_dir=/proc/1/nope"):
        validate(ExperimentConfig(data=DataConfig(cache_dir="/proc/1/nope")))


WORKER = r'''
import hashlib, json, sys
from research.data import pipeline as data
from research.run import build as build_lib, distribute, train as train_lib
from research.config import AugmentConfig, ExperimentConfig, DataConfig, ModelConfig, TrainConfig
strategy = distribute.make_strategy("multi_worker")
config = ExperimentConfig(data=DataConfig(dataset=sys.argv[1], batch_size=8, image_size=16),
                          model=ModelConfig(backbone="small_cnn", weights="none"), train=TrainConfig(seed=1))
source, pipeline = build_lib.build_inputs(config, strategy, cache_dir=None, verbose=False)
# The training pipeline as built, but with the identity for preprocessing: batches then hold the images.
raw = data.Pipeline(source, batch_size=8, preprocess=lambda x: x, augment=AugmentConfig(), seed=1, cache="none",
                    replicas=strategy.num_replicas_in_sync)
assert raw.steps_per_epoch == pipeline.steps_per_epoch
seen = []
for x, y in raw.distribute(strategy, lambda: raw.train_stream(0, 1, augment=False)):
    for local in strategy.experimental_local_results(x):
        seen += [hashlib.sha1(i.astype("uint8").tobytes()).hexdigest() for i in local.numpy()]
own = [hashlib.sha1(x.tobytes()).hexdigest() for x, _ in source.train.as_numpy_iterator()]
json.dump({"shard": list(source.shard), "own": own, "seen": seen, "steps": pipeline.steps_per_epoch},
          open(sys.argv[2], "w"))
'''


def test_two_workers_read_disjoint_shards_that_cover_the_split_once(tmp_path, shards, jpegs):
    from launch.multiworker import free_ports
    ports = free_ports(2)
    procs = []
    for i in range(2):
        tf_config = {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]}, "task": {"type": "worker", "index": i}}
        env = dict(os.environ, TF_CONFIG=json.dumps(tf_config), TF_CPP_MIN_LOG_LEVEL="2")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, f"tfrecord:{shards}", str(tmp_path / f"w{i}.json")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    w = [json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2)]
    assert [x["shard"] for x in w] == [[0, 2], [1, 2]]
    everything = _hashes(sources.load_source(DataConfig(dataset=f"folder:{jpegs}"), 16).train)
    assert sorted(w[0]["own"] + w[1]["own"]) == sorted(h for _, h in everything)  # disjoint, each image once
    assert w[0]["steps"] == w[1]["steps"] == min(len(x["own"]) for x in w) // 4
    for x in w:  # an epoch: this worker's images only, none twice
        assert len(x["seen"]) == x["steps"] * 4 == len(set(x["seen"])) and set(x["seen"]) <= set(x["own"])


@pytest.mark.slow  # ~27 s; the shards' disjointness: test_two_workers_read_disjoint_shards_that_cover_the_split_once
def test_two_workers_train_on_their_own_shards(tmp_path, shards):
    wd = tmp_path / "mw"
    r = run_module("launch.multiworker", "--num_workers=2", "--", f"--workdir={wd}", f"--dataset=tfrecord:{shards}",
                   "--backbone=small_cnn", "--image_size=16", "--batch_size=16", "--finetune_epochs=2", "--noexport")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(worker 0 of 2 reads its own" in r.stdout
    m = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["files"]
    fewest = min(sum(f["count"] for f in m[w::2]) for w in range(2))
    assert f"{fewest // 8}/{fewest // 8} - " in r.stdout  # steps: the worker with the fewest images, 8 per replica
    assert json.loads((wd / "results.json").read_text())["epochs_run"] == 2


# --- Exact resume after SIGKILL -----------------------------------------------------------------

RESUME = ["--deterministic", "--backbone=small_cnn", "--image_size=16", "--batch_size=16", "--steps_per_loop=3",
          "--dropout=0.3", "--horizontal_flip", "--rotation=10", "--checkpoint_keep=10", "--restore_best_weights",
          "--stages=name=head unfreeze=none epochs=1 lr=3e-3; name=ft unfreeze=top:2 epochs=2 lr=1e-3"]


# tfrecord + disk (default suite) covers both; each alone is in the slow suite.
@pytest.mark.parametrize("source,cache", [pytest.param("folder", "disk", marks=pytest.mark.slow),
                                          pytest.param("tfrecord", "none", marks=pytest.mark.slow),
                                          ("tfrecord", "disk")])
def test_sigkill_then_resume_is_bit_identical(tmp_path, jpegs, shards, source, cache):
    from tests.test_resume import assert_killed_run_resumes_bit_identically
    dataset = f"folder:{jpegs}" if source == "folder" else f"tfrecord:{shards}"
    # Two stages, killed after the first epoch of the second: the unfreezing and best/ seams too.
    assert_killed_run_resumes_bit_identically(tmp_path, RESUME + [f"--dataset={dataset}", f"--cache={cache}"], 3)
