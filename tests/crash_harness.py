"""SIGKILL a projector worker at many random points, fast: run by tests/test_crash.py as
``python -m tests.crash_harness KILLS SEED`` with the projector's environment.

The harness imports everything once, then forks one worker process per life (a fork
costs milliseconds where a fresh interpreter costs a second). Each child builds its own
connections and runs :class:`ProjectorWorker` until caught up, writing one byte to a pipe
after every committed batch. The parent lets it commit 0-2 batches, waits a random
0-40 ms more (so the kill lands anywhere: polling, folding, inside the transaction,
between batches) and SIGKILLs it. After ``KILLS`` kills, a last child runs to the end.
Prints one JSON line: ``{"kills", "mid_stream", "lives", "batches"}``.

The parent opens no connection and starts no thread before forking.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import sys
import time
from dataclasses import replace

from beliefstore.events.serde import AvroSerde
from beliefstore.projector.catalog import ProjectionCatalog
from beliefstore.projector.worker import ProjectorWorker
from beliefstore.settings import Settings


def child(write_fd: int) -> None:
    """One life of the worker: project until caught up, a byte per committed batch."""
    settings = Settings.from_env(use_running=False)
    catalog = ProjectionCatalog.from_settings(settings)
    info = catalog.active()  # as `beliefstore projector` does
    worker = ProjectorWorker(replace(settings, db_schema=info.schema, projection=info.name),
                             catalog.engine(info.schema), serde=AvroSerde.for_settings(settings))
    with worker:
        worker.run(until_caught_up=True, on_batch=lambda _stats: os.write(write_fd, b"."))
    os._exit(0)


def main(kills: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    done = {"kills": 0, "mid_stream": 0, "lives": 0, "batches": 0}
    while True:
        last = done["kills"] >= kills
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            try:
                child(write_fd)
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(1)
        os.close(write_fd)
        done["lives"] += 1
        wanted = rng.randint(0, 2)
        seen = 0
        exited = None
        deadline = time.monotonic() + 60
        while not last and seen < wanted and time.monotonic() < deadline:
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if ready:
                chunk = os.read(read_fd, 64)
                if not chunk:  # the child exited: caught up
                    break
                seen += len(chunk)
        if not last:
            time.sleep(rng.uniform(0.0, 0.04))
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                exited = status
            else:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                done["kills"] += 1
                done["mid_stream"] += 1
        else:
            _, exited = os.waitpid(pid, 0)
        done["batches"] += seen
        while chunk := os.read(read_fd, 4096):  # what it committed before dying
            done["batches"] += len(chunk) if not last else 0
        os.close(read_fd)
        if exited is not None:
            if os.waitstatus_to_exitcode(exited) != 0:
                raise SystemExit(f"a worker failed with status {exited}")
            if last:
                return done
            # caught up before the kill: the remaining lives find nothing to do
            return done


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
