"""One interface for independent candidate evaluations: serial, a process pool, or Ray.

``get_executor("auto")`` gives a process pool when more than one core is free and the work is
worth it, else serial; ``"ray"`` uses Ray when it is installed (so a large sweep can use a
cluster). Results come back in input order and are identical whichever executor runs them,
since every task is a pure function of its arguments (seeded where random).
"""

from __future__ import annotations

__all__ = ["Executor", "SerialExecutor", "ProcessExecutor", "RayExecutor", "get_executor"]

import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterable, Sequence

from .errors import UsageError


class Executor:
    name = "executor"

    def map(self, fn: Callable, items: Iterable) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def imap(self, fn: Callable, items: Iterable):
        """Results in input order as they become available (so a caller can cache each one at once)."""
        yield from self.map(fn, items)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SerialExecutor(Executor):
    name = "serial"

    def map(self, fn, items):
        return [fn(x) for x in items]

    def imap(self, fn, items):
        for x in items:
            yield fn(x)


class ProcessExecutor(Executor):
    """A process pool (spawned workers: onnxruntime sessions are not fork-safe). ``fn`` and the
    items must be picklable (module-level functions, plain data, model bytes)."""

    name = "process"

    def __init__(self, workers: int | None = None):
        import multiprocessing as mp

        self.workers = workers or max(1, (os.cpu_count() or 2))
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"))

    def map(self, fn, items):
        return list(self._pool.map(fn, list(items)))

    def imap(self, fn, items):
        yield from self._pool.map(fn, list(items))

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor(Executor):
    """Ray tasks; joins a running cluster when RAY_ADDRESS is set, else starts a local one."""

    name = "ray"

    def __init__(self, workers: int | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("executor 'ray' needs the ray package (pip install ray)") from None
        self._ray = ray
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), num_cpus=workers, ignore_reinit_error=True,
                     log_to_driver=False)

    def map(self, fn, items):
        remote = self._ray.remote(fn)
        return self._ray.get([remote.remote(x) for x in items])

    def imap(self, fn, items):
        remote = self._ray.remote(fn)
        for ref in [remote.remote(x) for x in items]:
            yield self._ray.get(ref)


def get_executor(name: str = "auto", workers: int | None = None, n_tasks: int | None = None) -> Executor:
    """serial | process | ray | auto (process pool for 4+ tasks on 2+ cores, else serial)."""
    if name == "serial":
        return SerialExecutor()
    if name == "process":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(workers)
    if name == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if cores >= 2 and (n_tasks is None or n_tasks >= 4):
            return ProcessExecutor(workers or cores)
        return SerialExecutor()
    raise UsageError(f"unknown executor '{name}'; known: auto, serial, process, ray")
