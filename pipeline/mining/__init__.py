"""Offline hard-negative candidate mining: exact k-nearest neighbours of both directions.

* :func:`mine_torch` -- one tiled low-precision pass serving i2t and t2i, provably exact.
* :func:`mine_faiss` -- FAISS flat (exact) or ivf / hnsw (approximate), one search per direction.
* :func:`mine_reference` -- brute force in float64 (small inputs; the definition of "exact").

All return a :class:`KnnResult`; ids follow the tie rule of ``reference`` (descending
canonical float64 score, equal scores by the lower id).
"""
from pipeline.mining.knn_faiss import mine_faiss
from pipeline.mining.knn_torch import lowp_error_bound, mine_torch
from pipeline.mining.reference import (KnnResult, canonical_dot, canonical_matrix,
                                       mine_reference, recall)

__all__ = ["KnnResult", "mine_torch", "mine_faiss", "mine_reference", "lowp_error_bound",
           "canonical_dot", "canonical_matrix", "recall"]
