"""Analysis: what the scores are for — clustering, mislabel suspects, the embedding baseline.

Contract: functions over stored vectors, blockwise where N can be large: spherical k-means on unit
TracIn vectors (`spherical_kmeans`, `choose_n_clusters`), the mislabel ranking recipes
(`mislabel_scores`, `RECIPES`), and the penultimate-embedding kNN baseline (`embedding_neighbors`).
They read a run through the methods it offers and never touch the model.

A new analysis goes here and is offered on `tracin.Run`.
"""

from tracin.analysis._cluster import Clusters, choose_n_clusters, silhouette, spherical_kmeans
from tracin.analysis._metrics import auroc, recall_at, recall_curve
from tracin.analysis._similarity import embedding_neighbors, nearest_other_rows
from tracin.analysis._suspects import RECIPES, MislabelScores, mislabel_scores

__all__ = [
    "auroc",
    "nearest_other_rows",
    "recall_at",
    "recall_curve",
    "Clusters",
    "MislabelScores",
    "RECIPES",
    "choose_n_clusters",
    "embedding_neighbors",
    "mislabel_scores",
    "silhouette",
    "spherical_kmeans",
]
