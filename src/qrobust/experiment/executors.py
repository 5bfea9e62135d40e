"""Where a study's work runs: in this process (``local``, the default) or on a Ray cluster (``ray``).

Both run the same two kinds of work: ``prepare(seed)`` (the seed's data and trained models: the
context) and ``run_cell(ctx, cell)`` (one record). The local executor runs them in order; the Ray
executor runs every seed's ``prepare`` as one task and every cell of every seed as a task with the
cell's CPU/GPU needs, the context travelling through Ray's object store (it is put there once per
seed, never fetched by the driver). There is no barrier between seeds: a seed's cells start as soon as
its own ``prepare`` is done, while other seeds still train (a seed whose models are cached by an
earlier call starts at once). The small ``info`` of each ``prepare`` is fetched with :meth:`fetch`
when the driver needs it. Records come back to the driver, which writes the run folder, so
``results.json`` is the same on either executor: every record depends only on its context and cell.

Ray and shared storage: trained-model stages are written by the ``prepare`` task into the run folder.
On a local Ray (the default when no address is given) that is this machine's disk; on a multi-node
cluster ``out_root`` must be storage that every node sees (e.g. NFS), as it is for resuming anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from qrobust.errors import ConfigError
from qrobust.experiment.spec import Cell

EXECUTORS = ("local", "ray")


class LocalExecutor:
    """Everything in this process, in order."""

    name = "local"

    def prepare(self, fn: Callable[[int], tuple[dict, Any]], seeds: list[int]) -> dict[int, tuple[dict, Any]]:
        """``fn(seed) -> (info, ctx)`` for every seed: ``{seed: (info, ctx)}``."""
        return {seed: fn(seed) for seed in seeds}

    def fetch(self, info: Any) -> dict:
        """The ``info`` that :meth:`prepare` returned (already here)."""
        return info

    def run_cells(self, fn: Callable[[Any, Cell], dict], work: list[tuple[int, Any, Cell]]
                  ) -> Iterator[tuple[int, Cell, dict]]:
        for seed, ctx, cell in work:
            yield seed, cell, fn(ctx, cell)

    def close(self) -> None:
        pass


def _run_with_threads(fn: Callable, threads: float, *args: Any) -> Any:
    """Run ``fn(*args)`` in a Ray worker with torch using the task's CPUs (Ray sets OMP threads to 1)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return fn(*args)


class RayExecutor:
    """Seeds' ``prepare`` and cells as Ray tasks.

    ``address``: an existing cluster (``"auto"`` or ``"ray://host:10001"``); empty starts a local Ray
    with ``num_cpus`` CPUs (0 = all). ``prepare_cpus``/``prepare_gpus``: what a ``prepare`` task
    reserves (training runs there). ``task_gpus``: the GPU share every task reserves at least (e.g.
    0.25: four tasks share one GPU); give it with ``device=cuda`` or ``auto``, or tasks get no GPU.
    """

    name = "ray"

    def __init__(self, address: str = "", num_cpus: int = 0, prepare_cpus: float = 1.0, prepare_gpus: float = 0.0,
                 task_gpus: float = 0.0):
        if min(prepare_cpus, prepare_gpus, task_gpus) < 0:
            raise ConfigError("Ray task resources must be >= 0")
        try:
            import ray
        except ModuleNotFoundError:
            raise ConfigError("--executor ray needs Ray: pip install 'ray>=2.9' (make setup installs it)") from None
        self.ray = ray
        self.prepare_cpus, self.prepare_gpus = prepare_cpus, max(prepare_gpus, task_gpus)
        self.task_gpus = task_gpus
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                                      "configure_logging": False}
            if address:
                kwargs["address"] = address
            elif num_cpus:
                kwargs["num_cpus"] = num_cpus
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise ConfigError(f"could not start or join {where}: {str(err).splitlines()[0][:200]}; "
                                  "check the address (or leave it empty for a local Ray)") from None
            self._started = True
        self._task = ray.remote(_run_with_threads)

    def prepare(self, fn: Callable[[int], tuple[dict, Any]], seeds: list[int]) -> dict[int, tuple[Any, Any]]:
        """One task per seed, submitted without waiting: ``{seed: (info ref, ctx ref)}``. Cell tasks
        receive the context's ObjectRef, so Ray starts them when their own seed is prepared; a failed
        ``prepare`` raises its own error from :meth:`fetch` or from the first of its cells that is fetched."""
        task = self._task.options(num_cpus=self.prepare_cpus, num_gpus=self.prepare_gpus, num_returns=2)
        refs = {seed: task.remote(fn, self.prepare_cpus, seed) for seed in seeds}
        return {seed: (info, ctx) for seed, (info, ctx) in refs.items()}

    def fetch(self, info: Any) -> dict:
        """The ``info`` of a ``prepare`` task (waits for it; its own error if it failed)."""
        return self._get(info)

    def run_cells(self, fn: Callable[[Any, Cell], dict], work: list[tuple[int, Any, Cell]]
                  ) -> Iterator[tuple[int, Cell, dict]]:
        pending = {}
        for seed, ctx_ref, cell in work:
            task = self._task.options(num_cpus=cell.cpus, num_gpus=max(cell.gpus, self.task_gpus))
            pending[task.remote(fn, cell.cpus, ctx_ref, cell)] = (seed, cell)
        while pending:
            done, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in done:
                seed, cell = pending.pop(ref)
                yield seed, cell, self._get(ref)

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            cause = err.as_instanceof_cause()
            raise cause from None

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, *, address: str = "", num_cpus: int = 0, prepare_cpus: float = 1.0,
                  prepare_gpus: float = 0.0, task_gpus: float = 0.0):
    """``local`` or ``ray`` (see :class:`RayExecutor` for the Ray settings)."""
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address, num_cpus, prepare_cpus, prepare_gpus, task_gpus)
    raise ConfigError(f"executor '{name}' is unknown; use one of: {', '.join(EXECUTORS)}")
