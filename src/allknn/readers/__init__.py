"""Sources: embedding files (by extension), parquet columns and row ids.

pyarrow and h5py are optional: they are imported only by the functions
that need them, and a missing one raises ``ImportError`` naming the extra
to install (``pip install 'allknn[parquet]'`` or ``'allknn[hdf5]'``).
"""

from allknn.readers.files import Embeddings, load
from allknn.readers.ids import read_ids

__all__ = ["Embeddings", "load", "read_ids"]
