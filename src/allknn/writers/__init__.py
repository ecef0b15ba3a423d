"""Outputs: result files (``.npz``, parquet neighbour tables), written
atomically, and the checkpoints of resumable runs."""

from allknn.writers.neighbor_table import ParquetNeighborWriter
from allknn.writers.results import load_result, save_edges, save_result

__all__ = ["ParquetNeighborWriter", "load_result", "save_edges", "save_result"]
