"""A training-gradient index: ask new questions without a pass over the training data.

Every training example's gradient is compressed once (per tracked layer, to ``width`` numbers in
all) into memory-mapped shards (:func:`build_index`, or the
:class:`~lightning_influence.callbacks.InfluenceIndex` callback during the scoring pass it
already runs). A new query then costs its own gradient, an exact search over the codes for the
K largest and K most negative index estimates, and an exact EK-FAC re-rank of those candidates
(:meth:`TrainingIndex.query`).

- :mod:`~lightning_influence.index.compression`: the codes (``"sketch"``, ``"eigen"``,
  ``"kronecker"``);
- :mod:`~lightning_influence.index.files`: the manifest and the shards on disk;
- :mod:`~lightning_influence.index.building`: :func:`build_index`, :class:`IndexWriter`;
- :mod:`~lightning_influence.index.querying`: :func:`open_index`, :class:`TrainingIndex`.
"""

from lightning_influence.index.building import IndexWriter, build_index
from lightning_influence.index.compression import Compression, make_compression
from lightning_influence.index.files import (
    CorruptIndexError,
    IncompleteIndexError,
    IndexMismatchError,
)
from lightning_influence.index.querying import IndexResult, TrainingIndex, open_index

__all__ = ["build_index", "open_index", "TrainingIndex", "IndexResult", "IndexWriter",
           "Compression", "make_compression", "IndexMismatchError", "CorruptIndexError",
           "IncompleteIndexError"]
