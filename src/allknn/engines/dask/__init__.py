"""The Dask engine: the exact kNN graph on a cluster (see :mod:`allknn.engines.dask.run`).

``dask[distributed]`` is the optional extra ``allknn[dask]``; the local path
never imports this package's client side.
"""

from allknn.engines.dask.estimate import estimate_dask_seconds
from allknn.engines.dask.run import TASK_ROWS, dask_neighbors, task_rows_for

__all__ = ["TASK_ROWS", "dask_neighbors", "estimate_dask_seconds", "task_rows_for"]
