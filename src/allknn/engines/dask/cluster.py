"""The local cluster ``allknn run --workers N`` starts, with Dask's
housekeeping made less frequent.

A Dask process checks its event loop every 20 ms (``admin.tick``), a worker
samples its threads' stacks every 10 ms (``worker.profile``) and its nanny
reads the worker's memory every 100 ms: on an idle 2-core machine, a
scheduler and two workers took 1.9 s of CPU per 10 s, which a kNN job's
tasks lose. With these settings they take 0.28 s. The task stream in the
dashboard is unchanged; the per-task profiles are not collected, and
memory limits are enforced within half a second rather than a tenth.
The same settings suit a cluster of one's own, dedicated to allknn
(environment variables of ``dask scheduler`` and ``dask worker``:
``DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s`` and so on).
"""

from __future__ import annotations

from typing import Any

from allknn._optional import optional

QUIET_SETTINGS: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.worker.memory.monitor-interval": "500ms",
    "distributed.admin.system-monitor.interval": "2s",
}
"""Dask settings of the processes of :func:`local_cluster`."""


def local_cluster(workers: int, threads: int, **options: Any):
    """A ``LocalCluster`` of ``workers`` processes of ``threads`` threads
    each, its processes started with :data:`QUIET_SETTINGS`.

    Parameters
    ----------
    workers, threads : int
    **options
        More arguments of ``distributed.LocalCluster`` (``dashboard_address``...).
    """
    distributed = optional("distributed", "running on a Dask cluster")
    import dask  # installed with distributed

    with dask.config.set(QUIET_SETTINGS):  # read as each process starts
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                                        **options)
