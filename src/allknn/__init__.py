"""allknn: every item's k most cosine-similar items, exactly and fast."""

from allknn.api import neighbors
from allknn.io import load, load_result, neighbors_frame
from allknn.result import TopK

__version__ = "0.1.0"

__all__ = ["TopK", "__version__", "load", "load_result", "neighbors", "neighbors_frame"]
