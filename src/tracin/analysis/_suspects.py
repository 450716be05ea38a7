"""Mislabel suspects: one ranking of training rows, the recipe measured best by default.

``mislabel_scores(run)`` scores every training row (higher = more likely mislabelled). The
default recipe, ``"contrast"``, is the contrastive self-influence: TracIn self-influence minus
the mean TracIn influence on the row's ``k`` nearest neighbors in the stored penultimate
embedding, every checkpoint weighted 1, on the gradients of the final layer's bias. It was
chosen by `benchmarks/mislabel_sweep.py` (layers x checkpoint weights x k x contrast, two
regimes, 3 seeds, on digits and MNIST-1D) and checked on a tabular set and an MNIST sample it
was not chosen on; ``docs/quality.md`` has every number. ``"paper"`` is the paper's
self-influence (``sum_c lr_c ||g_c(z)||^2`` over the stored parameters, `Run.self_influence`).

The recipe needs what featurize stored: the final bias (``layers=[...]``) and the penultimate
embedding (``embedding_layer=...``). A run without the embeddings (or a streaming run, or more
than `CONTRAST_MAX_ROWS` rows, where the neighbor search is quadratic) falls back to the unit-
weighted self-influence; so does a run whose embedding neighbors mostly carry other labels
(fewer than `AGREEMENT_MIN` of them share the row's given label: the contrast then compares a
row with the wrong class). A run over more than the final bias keeps the contrast over what it
stored. Each departure is said in ``notice``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tracin._errors import ConfigError, StoreError
from tracin._validate import integer
from tracin.analysis._similarity import nearest_other_rows
from tracin.scoring._maths import lr_weighted_sum
from tracin.scoring._protocol import StoredRun
from tracin.store._store import EMBEDDING

__all__ = ["CONTRAST_MAX_ROWS", "RECIPES", "MislabelScores", "mislabel_scores"]

Recipe = Literal["contrast", "self-influence", "paper"]
RECIPES: tuple[Recipe, ...] = ("contrast", "self-influence", "paper")
CONTRAST_MAX_ROWS = 50_000  # the (N, N)-blockwise neighbor search is left out above this
DEFAULT_K = 10
AGREEMENT_MIN = 0.5  # chosen in docs/quality.md: below it the contrast loses to self-influence


@dataclass(frozen=True)
class MislabelScores:
    """A mislabel ranking of the training rows.

    Attributes:
        scores: ``(N,)`` float64, higher = more likely mislabelled.
        recipe: the recipe that produced ``scores`` (after any fallback).
        description: the recipe in words, for a column header or a report.
        notice: what differs from the measured recipe and how to get it, or ``None``.
    """

    scores: np.ndarray
    recipe: Recipe
    description: str
    notice: str | None = None

    def order(self, top: int | None = None) -> np.ndarray:
        """Training row indices, most suspect first.

        Args:
            top: how many rows to keep (a positive integer; more than there are keeps all), or
                ``None`` (default) for all rows.

        Raises:
            ConfigError: ``top`` is not a positive integer (``0`` no longer means all rows: pass
                ``top=None`` for all rows).
        """
        order = np.argsort(-self.scores, kind="stable")
        if top is None:
            return order
        try:
            count = integer("top", top, example=100)
        except ConfigError as exc:
            raise ConfigError(f"{exc}; or pass top=None for all rows") from None
        return order[:count]

    def _repr_html_(self) -> str:
        """A notebook table of the most suspect rows: rank, row, score, label, example."""
        from tracin.display._tables import suspects_html

        return suspects_html(self)

    def to_frame(self) -> Any:
        """A pandas DataFrame of every row, most suspect first: rank, row, score, label.

        Raises:
            MissingDependencyError: pandas is not installed.
        """
        from tracin.display._tables import suspects_frame

        return suspects_frame(self)

    def __getstate__(self) -> dict[str, Any]:
        """The fields alone: a notebook view (`tracin.display._tables`) is not pickled."""
        return {k: v for k, v in vars(self).items() if k != "_tracin_view"}


def mislabel_scores(
    run: StoredRun, recipe: str = "contrast", *, k: int = DEFAULT_K, strict: bool = False
) -> MislabelScores:
    """Score training rows for being mislabelled; sort descending to review.

    Args:
        run: a featurized run (`tracin.Run`); the default recipe wants ``layers=[<final bias>]`` and
            ``embedding_layer=<penultimate module>``.
        recipe: ``"contrast"`` (default, measured best: contrastive self-influence, unit
            checkpoint weights), ``"self-influence"`` (unit weights, no contrast) or
            ``"paper"`` (lr-weighted self-influence, `Run.self_influence`).
        k: neighbors of the contrast (clipped to ``N - 1``).
        strict: run the named recipe or raise: no fallback when the run lacks what it
            needs, and the contrast even when few neighbors share a label.

    Returns:
        `MislabelScores` with ``scores`` of shape ``(N,)``.

    Raises:
        ConfigError: an unknown ``recipe``, a bad ``k``, or (``strict``) a run without the
            stored embeddings or features the contrast needs.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"recipe={recipe!r}; expected one of {', '.join(RECIPES)}")
    integer("k", k, example=10)  # neighbors of the contrast
    if recipe == "paper":
        return MislabelScores(
            run.self_influence(), "paper", "TracIn self-influence, lr-weighted (paper)"
        )
    layers = _layer_notice(run)
    if recipe == "contrast":
        missing = _contrast_missing(run)
        if missing is None:
            kk = min(k, run.n_train - 1)
            neighbors = nearest_other_rows(run.embeddings("train"), kk)
            agreement = label_agreement(run, neighbors)
            if strict or agreement is None or agreement >= AGREEMENT_MIN:
                text = f"TracIn contrastive self-influence (k={kk}, unit checkpoint weights)"
                return MislabelScores(_contrast(run, neighbors), "contrast", text, layers)
            missing = (
                f"needs embedding neighbors that mostly share a label; here {agreement:.2f} "
                f"of them do (< {AGREEMENT_MIN})"
            )
        if strict:
            raise ConfigError(f"the contrast recipe {missing}")
        layers = f"the contrast {missing}; ranked by self-influence instead" + (
            f". Also: {layers}" if layers else ""
        )
    si = run.self_influence_by_checkpoint().sum(0)
    return MislabelScores(si, "self-influence", "TracIn self-influence (unit weights)", layers)


def label_agreement(run: StoredRun, neighbors: np.ndarray) -> float | None:
    """Fraction of embedding neighbors with the row's given label; ``None`` if unknown.

    The given label is read from the final bias's gradient at the first checkpoint,
    ``p - onehot(y)``, whose only negative entry is the label's (cross-entropy); so it is known
    only for an unprojected run over one bias vector.

    Args:
        run: the run.
        neighbors: ``(N, k)`` row indices of each row's neighbors.
    """
    params = run.config.parameters
    if len(params) != 1 or not params[0].endswith("bias"):
        return None
    if not run.config.projection.exact:
        return None
    grads = run.read_split("train", run.ckpt_ids[0])
    if grads.ndim != 2 or grads.shape[1] < 2:
        return None
    labels = np.asarray(grads).argmin(1)
    return float((labels[neighbors] == labels[:, None]).mean())


def _contrast(run: StoredRun, neighbors: np.ndarray) -> np.ndarray:
    from tracin.analysis._similarity import neighbor_contrast

    weights = [1.0] * len(run.lrs)
    si = lr_weighted_sum(zip(weights, run.self_influence_by_checkpoint(), strict=True))
    vectors = np.concatenate([block for _, block in run.folded_blocks(weights)])
    return neighbor_contrast(si, vectors, neighbors)


def _contrast_missing(run: StoredRun) -> str | None:
    """Why the contrast cannot run on ``run`` (with the fix), or ``None``."""
    if run.n_train < 2:
        return "needs at least 2 training rows"
    if run.streaming or not run.config.keep_features:
        return (
            "needs stored training features and penultimate embeddings: featurize with a store "
            "(keep_features=True), layers=[<final bias>] and embedding_layer=<the module before "
            "the final layer>"
        )
    if run.n_train > CONTRAST_MAX_ROWS:
        return f"searches neighbors in O(N^2); it is left out above {CONTRAST_MAX_ROWS} rows"
    try:
        run.store.read_block("train", EMBEDDING, 0)
    except (StoreError, OSError, KeyError):
        return (
            "needs penultimate embeddings: featurize with embedding_layer=<the module "
            "before the final layer>"
        )
    return None


def _layer_notice(run: StoredRun) -> str | None:
    """A notice when the run holds more than one bias vector (the recipe uses the final bias)."""
    params = run.config.parameters  # in model order: the last one is the final layer's
    if len(params) == 1:
        return None
    prefix = params[-1].rsplit(".", 1)[0]
    name = f"{prefix}.bias" if f"{prefix}.bias" in params else params[-1]
    return (
        f"the measured recipe uses the final layer's bias alone (its weight if it has no bias); "
        f"this run has {len(params)} parameter tensors. For it, featurize with layers=[{name!r}]"
    )
