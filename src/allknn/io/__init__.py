"""Input and output: embedding files, ids, result files and DataFrames.

pyarrow and h5py are optional: they are imported only by the functions
that need them, and a missing one raises ``ImportError`` naming the extra
to install (``pip install 'allknn[parquet]'`` or ``'allknn[hdf5]'``).
:func:`neighbors_frame` takes a pandas DataFrame, so pandas is there.
"""

from allknn.io.frame import neighbors_frame
from allknn.io.ids import read_ids
from allknn.io.neighbor_table import ParquetNeighborWriter
from allknn.io.readers import Embeddings, load
from allknn.io.writers import load_result, save_result

__all__ = [
    "Embeddings",
    "ParquetNeighborWriter",
    "load",
    "load_result",
    "neighbors_frame",
    "read_ids",
    "save_result",
]
