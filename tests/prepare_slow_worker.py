"""A stand-in for prepare_shard that writes into --out slowly (tests/test_data_prepare.py's SIGTERM test).

Importable by the spawned worker processes (they get the parent's sys.path)."""

import os
import time


def slow_shard(task):
    out, name = task[0], task[1]
    path = os.path.join(out, f"{name}.{os.getpid()}.writing")
    deadline = time.time() + 30  # Bounded, so a worker the parent failed to stop still ends.
    while time.time() < deadline:
        with open(path, "a") as f:
            f.write("x")
        time.sleep(0.05)
    return {"file": name, "num_examples": 0, "num_videos": 1, "num_skipped": 0, "skipped": []}
