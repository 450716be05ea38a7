"""The report of ``tracin report``: the demo's report, from a store and the user's spec.

It shows what the demo shows: a title, the highest self-influence, each query with the class the
model predicted and its label, explained for the prediction (`PredictedClassTask`, with the
spec's model and checkpoints) by the default cosine relevance with the raw TracInCP score beside
it for the first query, the embedding baseline, and the training rows' clusters by TracIn
similarity (spherical k-means, the number of clusters chosen by silhouette, most typical
members first). It mentions flipped labels only when the spec names them (``flipped``: a
boolean array over the training rows).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset, default_collate

from tracin._errors import ConfigError
from tracin._predicted import predicted_class_task, predictions
from tracin._spec import Spec
from tracin._task import ClassificationTask
from tracin.pipeline._open import open as open_run
from tracin.report._compose import compose_report
from tracin.report._html import Report

__all__ = ["MAX_CLUSTER_ROWS", "spec_report"]

MAX_CLUSTER_ROWS = 5000


def _captions(spec: Spec, split: str, rows: Sequence[int]) -> tuple[list[str], Any]:
    """Per query 'correct/MISCLASSIFIED: predicted p, label y'; its rows and the final model.

    Both are empty/None when the task is no classification or the split is no Dataset.
    """
    data = spec.queries.get(split)
    task = spec.task
    if not isinstance(task, ClassificationTask) or not isinstance(data, Dataset) or not rows:
        return [], None
    batch = default_collate([data[i] for i in rows])
    final = copy.deepcopy(spec.model)  # the model explained: the last checkpoint's weights
    final.load_state_dict(spec.checkpoints[len(spec.checkpoints) - 1].state_dict())
    final.eval()
    pred, labels = predictions(final, task, final.state_dict(), [batch])
    captions = [f"{'correct' if p == y else 'MISCLASSIFIED'}: predicted {p}, label {y}"
                for p, y in zip(pred, labels, strict=True)]  # fmt: skip
    return captions, (Subset(data, list(rows)), final)


def spec_report(
    store: str | Path, spec: Spec, split: str | None, rows: Sequence[int], k: int = 6
) -> Report:
    """Compose the report of ``store`` with ``spec``'s renderer, model and checkpoints.

    Args:
        store: the run directory written by ``tracin featurize``.
        spec: the loaded spec (it must define ``render``).
        split: the query split to explain, if any.
        rows: rows of ``split`` to explain.
        k: examples per row.

    Raises:
        ConfigError: the spec defines no ``render``.
    """
    if spec.render is None:
        raise ConfigError("the spec defines no `render(split, index)`; the report needs it")
    run = open_run(store)
    captions: list[str] = []
    live: tuple[Any, Any] = (None, None)
    if split is not None and rows:
        captions, found = _captions(spec, split, rows)
        if found is not None:
            data, final = found
            task = predicted_class_task(spec.task, reference=final)
            run = open_run(store, model=spec.model, task=spec.task, checkpoints=spec.checkpoints,
                           train_data=spec.train)  # fmt: skip
            live = (data, task)
    flipped = getattr(spec, "flipped", None)
    flag = None
    if flipped is not None:
        flipped = np.asarray(flipped, dtype=bool)
        flag = lambda i: "flipped label" if flipped[i] else ""  # noqa: E731
    n = run.n_train
    cluster_rows = None
    if not run.streaming:
        step = max(1, -(-n // MAX_CLUSTER_ROWS))
        cluster_rows = list(range(0, n, step))
    name = Path(store).resolve().name
    sub = (f"{n} training rows, {len(run.ckpt_ids)} checkpoints; explanations ranked by the "
           "cosine of gradients (lr-weighted over checkpoints), each query explained for the "
           "class the model predicted")  # fmt: skip
    return compose_report(
        run, spec.render, title=f"tracin report: {name}", subtitle=sub, query_split=split,
        query_rows=rows, query_captions=captions, k=k, flipped=flipped, flag=flag,
        cluster_rows=cluster_rows, n_clusters="auto",
        cluster_title="Training rows clustered by TracIn similarity (number chosen by silhouette)",
        query_data=live[0], query_task=live[1],
    )  # fmt: skip
