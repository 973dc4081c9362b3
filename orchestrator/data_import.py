"""An image-folder import spread over a Ray cluster: each shard is one Ray task.

``capi data import imagefolder DIR --address ADDR`` passes ``ray_runner(ADDR)`` to
``capi_core.data.imagefolder.import_imagefolder`` in place of its process pool. The driver plans the
shards, keeps the lock and writes the manifest; the tasks read the images and write their shards and
records, so the image folder and the output directory must be the same paths on every node (a shared
file system). The driver ships this project's packages to the workers (``orchestrator.cluster``).
Tasks ask for one CPU each and are spread over the nodes, so Ray runs as many at once as the cluster
has CPUs and every node's storage bandwidth is used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray

from orchestrator.cluster import join_cluster


def ray_runner(address: str | None) -> Callable[[Callable[[Any], Any], Sequence[Any]], Iterator[tuple[Any, int]]]:
    """A runner (``imagefolder.Runner``) over Ray: joins the cluster at ``address`` (shipping this project's
    packages to its workers) unless Ray is already up."""

    def run(fn: Callable[[Any], Any], tasks: Sequence[Any]) -> Iterator[tuple[Any, int]]:
        if not ray.is_initialized():
            join_cluster(address or "auto")
        # SPREAD: every node reads and writes its share, rather than the first to start taking them all.
        remote = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False, scheduling_strategy="SPREAD")(fn)
        pending = {remote.remote(task): len(task.files) for task in tasks}
        done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
                if not ready:
                    yield None, done
                for ref in ready:
                    done += pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as err:
                        raise err.cause from None  # the task's own DatasetError, naming the file
                    yield result, done
        finally:  # an error or an abandoned import: tasks not started yet are dropped
            for ref in pending:
                ray.cancel(ref)

    return run
