"""Reward worker processes with a time limit per call, so a slow or hanging user reward cannot stall training.

`RewardPool(fn, workers, timeout).map(items)` calls `fn(*item)` for every item in worker
processes and returns one `(status, value)` per item, in order: ("ok", result), ("error",
traceback text) or ("timeout", None). A worker past its deadline is killed and replaced, and the
rest of the batch goes on. Workers come from a forkserver (spawn where there is none), never a
fork of the training process: a fork of a process holding torch's threads can deadlock. Each
worker receives `fn` pickled once and calls `fn.prepare()` (if it has one) before it reports
ready, so imports are not charged to the first call's time limit.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
import time
import traceback
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

log = logging.getLogger("rlvr_fast")

STARTUP_TIMEOUT_S = 120.0


def _worker(conn: Connection, payload: bytes) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle (it saves a checkpoint)
    try:
        fn = pickle.loads(payload)
        if hasattr(fn, "prepare"):
            fn.prepare()
        conn.send(("ready", None))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        job = conn.recv()
        if job is None:
            return
        index, item = job
        try:
            conn.send((index, "ok", fn(*item)))
        except Exception:
            conn.send((index, "error", traceback.format_exc()))


class RewardPool:
    def __init__(self, fn: Callable, workers: int = 2, timeout: float = 10.0):
        try:
            self._payload = pickle.dumps(fn)
        except Exception as exc:
            raise ValueError(f"the reward cannot be sent to worker processes ({exc}); define it at module level") from None
        self.num_workers, self.timeout = workers, timeout
        methods = mp.get_all_start_methods()
        self._ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if self._ctx.get_start_method() == "forkserver":
            # The server imports the package (and torch) once; workers forked from it, first or replacement,
            # start in milliseconds instead of re-importing. No-op once the server runs.
            self._ctx.set_forkserver_preload(["rlvr_fast.tasks.rewards"])
        self._workers: list[tuple[Any, Connection]] = []
        self.timeouts = 0
        self.replaced = 0

    def _start(self) -> tuple[Any, Connection]:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker, args=(child, self._payload), daemon=True, name="rlvr_fast-reward")
        proc.start()
        child.close()
        return proc, parent

    def _await_ready(self, workers: list[tuple[Any, Connection]]) -> None:
        for proc, conn in workers:
            if not conn.poll(STARTUP_TIMEOUT_S):
                raise RuntimeError(f"a reward worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
            status, detail = conn.recv()
            if status != "ready":
                raise RuntimeError(f"a reward worker could not load the reward:\n{detail}")

    def _ensure_started(self) -> None:
        if not self._workers:
            self._workers = [self._start() for _ in range(self.num_workers)]
            self._await_ready(self._workers)
            log.info("reward pool: %d worker processes (%s), %.3g s limit per call", self.num_workers,
                     self._ctx.get_start_method(), self.timeout)

    def _replace(self, worker: tuple[Any, Connection]) -> tuple[Any, Connection]:
        proc, conn = worker
        proc.kill()
        proc.join(5)
        conn.close()
        self._workers.remove(worker)
        new = self._start()
        self._await_ready([new])
        self._workers.append(new)
        self.replaced += 1
        return new

    def map(self, items: list[tuple]) -> list[tuple[str, Any]]:
        self._ensure_started()
        results: list[tuple[str, Any] | None] = [None] * len(items)
        pending = deque(enumerate(items))
        idle = list(self._workers)
        busy: dict[Connection, tuple[tuple[Any, Connection], int, float]] = {}  # conn -> (worker, index, deadline)
        while pending or busy:
            while idle and pending:
                worker = idle.pop()
                index, item = pending.popleft()
                worker[1].send((index, item))
                busy[worker[1]] = (worker, index, time.monotonic() + self.timeout)
            next_deadline = min(deadline for _, _, deadline in busy.values())
            for conn in wait(list(busy), timeout=max(0.0, next_deadline - time.monotonic())):
                worker, index, _ = busy.pop(conn)
                try:
                    _, status, value = conn.recv()
                    idle.append(worker)
                except (EOFError, OSError):  # the worker died (e.g. the reward called os._exit)
                    status, value = "error", "a reward worker process died while scoring this completion"
                    idle.append(self._replace(worker))
                results[index] = (status, value)
            now = time.monotonic()
            for conn, (worker, index, deadline) in list(busy.items()):
                if now >= deadline and not conn.poll():  # a result already waiting is not late
                    del busy[conn]
                    results[index] = ("timeout", None)
                    self.timeouts += 1
                    idle.append(self._replace(worker))
        return results

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in self._workers:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
            conn.close()
        self._workers = []
