"""Scoring: role 5 of the data flow — pure array maths over per-checkpoint features.

Contract: learning rates are applied in one place (`lr_weighted_sum`, `fold`); scores come
blockwise, memory bounded in the number of training rows; top-k lists are merged across blocks
(`top_k`, `merge_top_k`) into `Neighbors`. `Relevance` names how proponents, opponents and
neighbors are ranked (raw TracInCP or a normalised variant); `ExactIndex` and `FaissIndex`
search folded TracIn vectors. `trak_influence` is the TRAK-style preconditioned score (not
TracInCP) over stored projected features (`tracin.Run.trak_influence`).

A new score, relevance or neighbor index goes here.
"""

from tracin.scoring._index import ExactIndex, FaissIndex, NeighborIndex, proponents_and_opponents
from tracin.scoring._maths import Neighbors, fold, lr_weighted_sum, merge_top_k, products, top_k
from tracin.scoring._protocol import StoredRun
from tracin.scoring._relevance import RELEVANCES, Relevance
from tracin.scoring._trak import trak_influence

__all__ = [
    "trak_influence",
    "StoredRun",
    "proponents_and_opponents",
    "ExactIndex",
    "FaissIndex",
    "NeighborIndex",
    "Neighbors",
    "RELEVANCES",
    "Relevance",
    "fold",
    "lr_weighted_sum",
    "merge_top_k",
    "products",
    "top_k",
]
