"""Exact k-nearest neighbours of both directions in one tiled pass.

The answer is the one :func:`pipeline.mining.reference.mine_reference` defines: per image
the K_i2t captions, per caption the K_t2i images, by descending canonical float64 score
(ties by lower id), positives (caption j of image j // 5) excluded, scores reported as the
canonical score rounded to float32.

A package by concern: ``bound`` (the proven low-precision error bound and its proof),
``selection`` (exact keys, floors, the per-query selections), ``tiled_pass`` (the pass
over the tiles), ``api`` (``mine_torch`` and the block entry point of the dask shards).
"""
from pipeline.mining.knn_torch.api import _check_options, mine_torch, mine_torch_block  # noqa: F401
from pipeline.mining.knn_torch.bound import PRECISIONS, lowp_error_bound  # noqa: F401
