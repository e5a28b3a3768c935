"""Runs N local worker processes of `launch/train.py` with MultiWorkerMirroredStrategy.

    python -m launch.multiworker --num_workers=2 -- --workdir=/tmp/mw --finetune_epochs=5

Each process gets a `TF_CONFIG` naming all workers on loopback ports; worker 0 is
the chief and writes the workdir (checkpoints, summaries, results); the others
save their checkpoints to temporary folders. If a worker fails, the others are
stopped and the failure is reported. For testing and demos on one machine; on
a cluster, run `launch/train.py --strategy=multi_worker` on each host with its
own TF_CONFIG (see README).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from absl import app, flags

from launch import common

F = flags.FLAGS
flags.DEFINE_integer("num_workers", 2, "Number of local worker processes.")
flags.DEFINE_float("timeout", 3600, "Seconds before all workers are stopped.")


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def main(argv):
    train_args = argv[1:]
    if F.num_workers < 1:
        common.die(f"--num_workers={F.num_workers} must be >= 1", common.EXIT_USER_ERROR)
    if not any(a.startswith("--workdir=") for a in train_args):
        common.die("pass the training flags after --, including --workdir=DIR", common.EXIT_USER_ERROR)
    hosts = [f"127.0.0.1:{p}" for p in free_ports(F.num_workers)]
    procs = []
    for i in range(F.num_workers):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": hosts},
                                                     "task": {"type": "worker", "index": i}}))
        cmd = [sys.executable, "-m", "launch.train", "--strategy=multi_worker", *train_args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=None if i == 0 else subprocess.DEVNULL))
    deadline = time.time() + F.timeout
    status = 0
    while procs and time.time() < deadline:
        for i, p in enumerate(procs):
            rc = p.poll()
            if rc is not None and rc != 0:
                print(f"error: worker {i} exited with status {rc}; stopping the others", file=sys.stderr)
                status = rc
                break
        if status or all(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    else:
        status = status or 1
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
    sys.exit(status or procs[0].returncode or 0)


if __name__ == "__main__":
    app.run(common.guarded(main), flags_parser=common.parse_own_flags_then_passthrough)
