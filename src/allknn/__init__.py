"""allknn: every item's k most cosine-similar items, exactly and fast."""

from allknn.api import neighbors
from allknn.engines.dask import dask_neighbors
from allknn.frame import neighbors_frame
from allknn.inspect import inspect
from allknn.readers import load
from allknn.topk.result import TopK
from allknn.writers import load_result

__version__ = "0.1.0"

__all__ = ["TopK", "__version__", "dask_neighbors", "inspect", "load", "load_result", "neighbors",
           "neighbors_frame"]
