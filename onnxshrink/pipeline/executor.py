"""One interface for independent candidate evaluations: serial, a process pool, or Ray.

``get_executor("auto")`` gives a process pool when more than one core is free and the work is
worth it, else serial; ``"ray"`` uses Ray when it is installed (so a large sweep can use a
cluster). Results come back in input order and are identical whichever executor runs them,
since every task is a pure function of its arguments (seeded where random).
"""

from __future__ import annotations

__all__ = ["Executor", "SerialExecutor", "ProcessExecutor", "RayExecutor", "get_executor"]

import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from onnxshrink.errors import UsageError


class Executor:
    name = "executor"

    def map(self, fn: Callable, items: Iterable) -> list:  # pragma: no cover - abstract
        raise NotImplementedError

    def imap(self, fn: Callable, items: Iterable):
        """Results in input order as they become available (so a caller can cache each one at once)."""
        yield from self.map(fn, items)

    def share_file(self, path: str) -> None:
        """Declare a file every task reads. Executors whose workers see this machine's files do
        nothing; the Ray executor ships it to the nodes of a cluster."""

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


def _ray_task(fn: Callable, item, files: tuple):
    """Runs on a Ray worker: makes sure each shared file exists on this node (fetching its bytes
    from the object store when the worker sits on another machine), then ``fn(item)``."""
    for path, ref in files:
        if not os.path.exists(path):
            import ray

            data = ray.get(ref[0])
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.{os.getpid()}.part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: two workers on one node may race to write it
    return fn(item)


def _package_root() -> str:
    """The folder holding the ``onnxshrink`` package this driver imported."""
    return str(Path(__file__).resolve().parent.parent)


def _driver_path() -> list[str]:
    """This driver's ``sys.path`` entries a fresh interpreter lacks (the script's folder, a source
    tree, the package's own folder when it is not installed), for the workers of a local
    instance: what a spawned process pool's children inherit, so the same functions unpickle."""
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    out: list[str] = []
    for p in [*sys.path, _package_root()]:
        p = os.path.realpath(p or os.getcwd())
        if os.path.isdir(p) and p not in out and not any(p == q or p.startswith(q + os.sep) for q in prefixes):
            out.append(p)
    return out


def _thread_env() -> dict:
    """The driver's BLAS thread count for the workers. Ray sets OMP_NUM_THREADS=1 in its workers,
    and numpy's SVD through a threaded BLAS rounds differently with another thread count (1e-9
    relative), which would break "identical results whichever executor"."""
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    if "OMP_NUM_THREADS" not in env:
        n = None
        try:
            from threadpoolctl import threadpool_info
            n = max((i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"), default=None)
        except Exception:  # threadpoolctl missing: BLAS's own default, one thread per usable core
            pass
        env["OMP_NUM_THREADS"] = str(n or _usable_cores())
    return env


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class RayExecutor(Executor):
    """Ray tasks, one CPU each, results streamed in input order.

    Three cases, by where Ray runs:
      - ``RAY_ADDRESS`` set (``auto`` for a cluster ``ray start`` began on this machine, a head's
        ``host:port``, or ``ray://host:10001``): joins that cluster with this driver's
        ``onnxshrink`` package shipped to its workers (``runtime_env["py_modules"]``, so every node
        computes with the same code; the nodes need its dependencies installed); ``workers``
        bounds the tasks in flight; close disconnects and leaves the cluster running;
      - the caller already called ``ray.init``: uses that Ray as it is (its runtime_env decides
        what the workers import; tasks add this driver's module path, for a local instance),
        ``workers`` bounds the tasks in flight, and close leaves it alone;
      - else: starts a private local instance of ``workers`` CPUs (default: the usable cores)
        whose workers get this driver's module path, as a spawned process pool's children do;
        quiet (no dashboard, worker output not forwarded, Ray's log at ERROR); close shuts it down.
    Workers get the driver's BLAS thread count (see ``_thread_env``), so results match serial.
    """

    name = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise UsageError("executor 'ray' needs the ray package (pip install ray)") from None
        self._ray = ray
        self.workers = workers
        address = address or os.environ.get("RAY_ADDRESS") or None
        self._owns = False  # True when this executor called ray.init (so close calls ray.shutdown)
        self._limit = workers
        env = _thread_env()
        task_env = None
        quiet = dict(logging_level=logging.ERROR, log_to_driver=False)
        if ray.is_initialized():
            # a task's runtime_env can add env_vars but not upload folders: keep the caller's
            task_env = {"env_vars": {**env, "PYTHONPATH": self._module_path()}}
        elif address:
            ray.init(address=address, runtime_env={"py_modules": [str(Path(_package_root()) / "onnxshrink")],
                                                   "env_vars": env}, **quiet)
            self._owns = True
        else:
            with _quiet("ray"):  # token-auth notices are logged before logging_level applies
                ray.init(address="local", num_cpus=workers or _usable_cores(), include_dashboard=False,
                         runtime_env={"env_vars": {**env, "PYTHONPATH": self._module_path()}}, **quiet)
            self._owns = True
            self._limit = None  # the instance's CPU count bounds concurrency
        self._remote = ray.remote(_ray_task).options(num_cpus=1, runtime_env=task_env)
        self._files: dict = {}

    @staticmethod
    def _module_path() -> str:
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        return os.pathsep.join([*[p for p in _driver_path() if p not in path], *path])

    def share_file(self, path: str) -> None:
        """``path`` is read by every task: its bytes go to the object store once, and a worker on a
        node without the file writes it to the same path before running its task."""
        path = str(path)
        with open(path, "rb") as f:
            self._files[path] = self._ray.put(f.read())

    def map(self, fn, items):
        return list(self.imap(fn, items))

    def imap(self, fn, items):
        ray = self._ray
        items = list(items)
        files = tuple((p, [ref]) for p, ref in self._files.items())  # in a list: not resolved on submit
        fn_ref = ray.put(fn)
        refs: list = []
        running: set = set()
        done = 0
        try:
            while done < len(items):
                while len(refs) < len(items) and (self._limit is None or len(running) < self._limit):
                    ref = self._remote.remote(fn_ref, items[len(refs)], files)
                    refs.append(ref)
                    running.add(ref)
                if refs[done] in running:
                    ready, _ = ray.wait(list(running), num_returns=1)
                    running.difference_update(ready)
                while done < len(refs) and refs[done] not in running:
                    yield ray.get(refs[done])
                    refs[done] = None  # let the object store free it
                    done += 1
        finally:
            for ref in running:  # the caller stopped early (error, interrupt): stop the rest
                try:
                    ray.cancel(ref)
                except Exception:
                    pass

    def close(self):
        self._files.clear()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False


class _quiet:
    """Raise a logger's level for the duration of a block."""

    def __init__(self, name: str, level: int = logging.ERROR):
        self.logger, self.level = logging.getLogger(name), level

    def __enter__(self):
        self.saved = self.logger.level
        self.logger.setLevel(self.level)

    def __exit__(self, *exc):
        self.logger.setLevel(self.saved)


def get_executor(name: str = "auto", workers: int | None = None, n_tasks: int | None = None) -> Executor:
    """serial | process | ray | auto (process pool for 4+ tasks on 2+ cores, else serial)."""
    if name == "serial":
        return SerialExecutor()
    if name == "process":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(workers)
    if name == "auto":
        cores = _usable_cores()
        if cores >= 2 and (n_tasks is None or n_tasks >= 4):
            return ProcessExecutor(workers or cores)
        return SerialExecutor()
    raise UsageError(f"unknown executor '{name}'; known: auto, serial, process, ray")
