"""Review suspects in a local web app and record decisions; apply them for retraining.

Contract:

- `open_review(store, spec)` computes what the app shows once (the ranking from the store alone;
  given labels and the last checkpoint's predictions when the spec gives the data and model);
- `serve(review, sock, token)` runs the app on a bound socket until interrupted;
- decisions go to ``<store>/decisions.jsonl``, one fsynced line each (`DecisionLog`);
  `read_decisions`, `apply_decisions` and `export_decisions` read them back, without a server.
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path
from typing import Any

from tracin._errors import MissingDependencyError
from tracin.review._app import LOOPBACK, ReviewServer, bind, make_app
from tracin.review._data import Predictions, ReviewData, predictions_from_spec, rank_scores
from tracin.review._decisions import (
    DECISIONS_FILE,
    Decision,
    DecisionLog,
    ReviewedLabels,
    apply_decisions,
    export_decisions,
    read_decisions,
)

__all__ = [
    "DECISIONS_FILE",
    "LOOPBACK",
    "Decision",
    "DecisionLog",
    "Predictions",
    "ReviewData",
    "ReviewServer",
    "ReviewedLabels",
    "apply_decisions",
    "bind",
    "export_decisions",
    "make_app",
    "new_token",
    "open_review",
    "read_decisions",
    "serve",
]


def new_token() -> str:
    """A fresh random token (128 bits, URL-safe) for one server's lifetime."""
    return secrets.token_urlsafe(16)


def open_review(store: str | Path, spec: Any = None, score: str = "auto") -> ReviewServer:
    """Open a store for review: the ranking, labels, predictions and decisions so far.

    Args:
        store: a store written by featurize.
        spec: a loaded `tracin._spec.Spec` (its ``render``, ``train``, ``task``, ``model`` and
            ``checkpoints``), or ``None`` (rows shown by number, no labels or predictions).
        score: ``"auto"``, ``"contrastive"`` or ``"self-influence"`` (see `rank_scores`).

    Raises:
        StoreError: not a store. ConfigError: a bad ``score``. DataError: a bad decisions file.
    """
    from tracin.pipeline import open as open_run

    run = open_run(store)
    name, scores = rank_scores(run, score)
    preds = predictions_from_spec(spec, run.n_train) if spec is not None else Predictions(
        note="no spec: given labels and predictions unknown")  # fmt: skip
    render = None if spec is None else spec.render
    data = ReviewData(run, render, name, scores, preds)
    return ReviewServer(data, DecisionLog(store, run.n_train), new_token())


def serve(review: ReviewServer, sock: socket.socket, allow_any_host: bool = False) -> None:
    """Run the app on the bound, listening ``sock`` until interrupted (Ctrl-C).

    Raises:
        ConfigError: uvicorn is not installed.
        MissingDependencyError: uvicorn or starlette is missing: pip install 'tracin[review]'.
    """
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError(
            "tracin review needs its extra: pip install 'tracin[review]'"
        ) from None
    app = make_app(review, allow_any_host=allow_any_host)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def url(sock: socket.socket, token: str, shown_host: str | None = None) -> str:
    """The address to open: ``http://HOST:PORT/?token=...``."""
    host, port = sock.getsockname()[:2]
    host = shown_host or ("127.0.0.1" if host in ("0.0.0.0", "::") else host)
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{port}/?token={token}"
