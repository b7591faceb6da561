"""A stand-in for monkeytrain/train.py in the SLURM signal tests (MONKEYTRAIN_TRAIN_SCRIPT).

Every rank waits $STUB_DELAY seconds (0 unless set: train.py's imports), installs
SIGUSR1 and SIGTERM handlers (as the real trainer does), starts a child process
that keeps the default SIGUSR1 action (as a DataLoader worker would), writes
rank<RANK>.ready into $STUB_OUTPUT, then waits up to $STUB_WAIT (90) s for a
signal. It writes rank<RANK>.json with the signals it got, its arguments, what
the launcher told it, and whether its child survived, and exits 0 only if a
signal came.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

out = Path(os.environ["STUB_OUTPUT"])
rank = os.environ.get("RANK", "0")
received: list[str] = []
time.sleep(float(os.environ.get("STUB_DELAY", "0")))
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name.removeprefix("SIG")))
worker = subprocess.Popen(["sleep", "300"])  # dies if anyone signals it with SIGUSR1

(out / f"rank{rank}.ready").write_text(str(os.getpid()))
deadline = time.monotonic() + float(os.environ.get("STUB_WAIT", "90"))
while not received and time.monotonic() < deadline:
    time.sleep(0.1)
time.sleep(1.5)  # a duplicate signal, if one were sent, arrives meanwhile

report = {
    "signals": received,
    "worker_alive": worker.poll() is None,
    "argv": sys.argv[1:],
    "world_size": os.environ.get("WORLD_SIZE"),
    "env": {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "WANDB_MODE", "ACCELERATE_MIXED_PRECISION")},
}
worker.kill()
partial = out / f"rank{rank}.json.tmp"
partial.write_text(json.dumps(report))
partial.replace(out / f"rank{rank}.json")
sys.exit(0 if received else 1)
