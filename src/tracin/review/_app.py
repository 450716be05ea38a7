"""The review web app (Starlette): suspects, example pages, decisions, served on one socket.

Safety: a random token made at start-up is required for every request but the static files
(in the URL once, then a ``SameSite=Strict`` cookie) and, in the ``X-Tracin-Token`` header, for
every request that changes state (a cookie alone never does, so another site cannot post); the
``Host`` header must name the loopback address (DNS rebinding); pages forbid any script, style or
image not served by the app itself; Jinja2 escapes every string; request paths select a split by
name from the store's list and rows by integer, never a file.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np

from tracin._errors import ConfigError, TracInError
from tracin.review._data import ReviewData, default_relevance
from tracin.review._decisions import Decision, DecisionLog, make_decision

__all__ = ["LOOPBACK", "ReviewServer", "bind", "make_app"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STATIC = Path(__file__).resolve().parent.parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
PAGE_SIZE = 24


@dataclass
class Filters:
    """The suspects list's filters, parsed and checked from a request's query string."""

    given: int | None
    predicted: int | None
    status: str
    size: int

    def query(self, **extra: Any) -> str:
        """The filters (and ``extra``) as a URL query string."""
        items = {"given": self.given, "predicted": self.predicted,
                 "status": None if self.status == "all" else self.status,
                 "size": None if self.size == PAGE_SIZE else self.size, **extra}  # fmt: skip
        return urlencode({k: v for k, v in items.items() if v is not None})


def _int(value: str | None, name: str, low: int = 0, high: int | None = None) -> int | None:
    if value is None or value == "":
        return None
    try:
        out = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if out < low or (high is not None and out > high):
        raise ConfigError(f"{name}={out} is outside {low}..{high}")
    return out


def badge(d: Decision | None) -> str:
    """The short text the list shows for a row's decision."""
    if d is None:
        return ""
    return {"keep": "kept", "remove": "removed"}.get(d.decision, f"relabel \u2192 {d.label}")


class ReviewServer:
    """The app's state and pages: data, decisions log, token, templates."""

    def __init__(self, data: ReviewData, log: DecisionLog, token: str) -> None:
        import jinja2

        self.data, self.log, self.token = data, log, token
        self.cookie = "tracin_review_" + secrets.token_hex(4)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("tracin", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.relevance = default_relevance()

    # --- pages --------------------------------------------------------------------------------
    def page(self, name: str, **context: Any) -> str:
        """Render template ``review_<name>.html.j2`` with the shared context."""
        splits = [s for s in self.data.run.split_rows if s != "train"]
        decided = len(self.log.current)
        return self.env.get_template(f"review_{name}.html.j2").render(
            token=self.token, splits=splits, decided=decided, n_rows=self.data.n_rows,
            score_name=self.data.score_name, **context,
        )  # fmt: skip

    def filters(self, params: Any) -> Filters:
        """Parse the list filters.

        Raises:
            ConfigError: a value that is not a class, status or size.
        """
        top = max(self.data.preds.n_classes - 1, 0)
        status = params.get("status") or "all"
        if status not in ("all", "undecided", "decided"):
            raise ConfigError(f"status={status!r}; expected all, undecided or decided")
        return Filters(_int(params.get("given"), "given", 0, top),
                       _int(params.get("predicted"), "predicted", 0, top), status,
                       _int(params.get("size"), "size", 1, 500) or PAGE_SIZE)  # fmt: skip

    def filtered(self, f: Filters) -> Any:
        """Training rows in rank order that pass the filters."""
        order, preds = self.data.order, self.data.preds
        mask = np.ones(len(order), dtype=bool)
        if f.given is not None and preds.given is not None:
            mask &= preds.given[order] == f.given
        if f.predicted is not None and preds.predicted is not None:
            mask &= preds.predicted[order] == f.predicted
        if f.status != "all":
            decided = np.zeros(self.data.n_rows, dtype=bool)
            decided[list(self.log.snapshot())] = True
            mask &= decided[order] if f.status == "decided" else ~decided[order]
        return order[mask]

    def suspects(self, params: Any) -> str:
        """The ranked list: one page of the filtered suspects, resuming at the first undecided."""
        f = self.filters(params)
        rows = self.filtered(f)
        current = self.log.snapshot()
        pages = max(1, -(-len(rows) // f.size))
        page = _int(params.get("page"), "page", 0)
        sel = _int(params.get("sel"), "sel", -1)
        if page is None:  # resume: the page of the first undecided suspect
            decided = np.zeros(self.data.n_rows, dtype=bool)
            decided[list(current)] = True
            undecided = np.flatnonzero(~decided[rows])
            first = int(undecided[0]) if len(undecided) else 0
            page, sel = divmod(first, f.size)
        page = min(page, pages - 1)
        chunk = rows[page * f.size : (page + 1) * f.size]
        if sel is None:
            sel = next((i for i, r in enumerate(chunk) if int(r) not in current), 0)
        sel = len(chunk) - 1 if sel < 0 else min(sel, max(len(chunk) - 1, 0))
        items = [self._item(int(r), current.get(int(r))) for r in chunk]
        nxt = f.query() if f.status == "undecided" else f.query(page=page + 1, sel=0)
        return self.page(
            "suspects", items=items, filters=f, page=page, pages=pages, total=len(rows), sel=sel,
            classes=list(range(self.data.preds.n_classes)), note=self.data.preds.note,
            next_url="/?" + nxt if page + 1 < pages or f.status == "undecided" else "",
            prev_url="/?" + f.query(page=page - 1, sel=-1) if page > 0 else "",
        )  # fmt: skip

    def _item(self, row: int, decision: Decision | None) -> dict[str, Any]:
        preds = self.data.preds
        return {
            "row": row, "rank": int(self.data.rank_of[row]) + 1,
            "ex": self.data.example("train", row),
            "given": None if preds.given is None else int(preds.given[row]),
            "predicted": None if preds.predicted is None else int(preds.predicted[row]),
            "confidence": None if preds.confidence is None else float(preds.confidence[row]),
            "score": float(self.data.scores[row]), "badge": badge(decision),
            "decision": "" if decision is None else decision.decision,
        }  # fmt: skip

    def example_page(self, split: str, row: int, params: Any) -> str:
        """One row: its proponents, opponents, embedding neighbors, cluster; decisions if train."""
        self.data.check_row(split, row)
        raw = params.get("relevance") == "tracin"
        relevance = "tracin" if raw else self.relevance
        k = 8
        strips = []
        if not self.data.run.streaming:  # a store of exact squared norms only: no explanations
            props, opps = self.data.neighbors(split, row, k, relevance)
            strips = [(f"Proponents ({relevance})", props), (f"Opponents ({relevance})", opps)]
        near = self.data.embedding_neighbors(split, row, k)
        if near is not None:
            strips.append(("Nearest by embedding (cosine)", near))
        lines = [(title, [self._card(int(i), float(s)) for i, s in
                          zip(nb.indices[0], nb.scores[0], strict=True)])
                 for title, nb in strips]  # fmt: skip
        streaming = self.data.run.streaming
        cluster = self.data.cluster_of(row, k) if split == "train" and not streaming else None
        if cluster is not None:
            c, size, typical = cluster
            lines.append((f"Its cluster {c + 1} ({size} rows; most typical)",
                          [self._card(r, None) for r in typical]))  # fmt: skip
        item = self._item(row, self.log.current.get(row)) if split == "train" else None
        rank = int(self.data.rank_of[row]) if split == "train" else -1
        back = "/queries/" + quote(split) + "?" + urlencode({"page": row // PAGE_SIZE})
        nav = {"next": "", "prev": "", "back": back}
        if split == "train":
            order = [int(r) for r in self.data.order[max(rank - 1, 0) : rank + 2]]
            nav = {
                "next": f"/example/train/{order[-1]}" if order[-1] != row else "",
                "prev": f"/example/train/{order[0]}" if order[0] != row else "",
                "back": "/?" + urlencode({"page": rank // PAGE_SIZE, "sel": rank % PAGE_SIZE}),
            }
        return self.page(
            "example", split=split, row=row, ex=self.data.example(split, row), item=item,
            lines=lines, raw=raw, relevance=self.relevance, nav=nav, streaming=streaming,
            classes=list(range(self.data.preds.n_classes)),
        )  # fmt: skip

    def _card(self, row: int, score: float | None) -> dict[str, Any]:
        d = self.log.current.get(row)
        return {"ex": self.data.example("train", row), "score": score, "badge": badge(d),
                "decision": "" if d is None else d.decision, "row": row}  # fmt: skip

    def queries_page(self, split: str, params: Any) -> str:
        """A stored query split, paged; each row links to its example page.

        Raises:
            ConfigError: ``split`` is not a stored query split, or a malformed ``page``.
        """
        if split == "train" or split not in self.data.run.split_rows:
            raise ConfigError(f"split {split!r} is not a stored query split")
        n = self.data.run.split_rows[split]
        pages = max(1, -(-n // PAGE_SIZE))
        page = min(_int(params.get("page"), "page", 0) or 0, pages - 1)
        rows = range(page * PAGE_SIZE, min(n, (page + 1) * PAGE_SIZE))
        cards = [{"ex": self.data.example(split, r), "row": r} for r in rows]
        return self.page("queries", split=split, cards=cards, page=page, pages=pages)

    # --- decisions ----------------------------------------------------------------------------
    def decide(self, body: Any) -> dict[str, Any]:
        """Record one decision from a request body ``{row, decision, label}``.

        Raises:
            ConfigError: a malformed body, row, decision or label.
        """
        if not isinstance(body, dict):
            raise ConfigError("the body must be a JSON object {row, decision, label}")
        row, kind, label = body.get("row"), body.get("decision"), body.get("label")
        n_classes = self.data.preds.n_classes
        if kind == "relabel" and n_classes and isinstance(label, int) and label >= n_classes:
            raise ConfigError(f"label={label} is outside the classes 0..{n_classes - 1}")
        given = self.data.preds.given
        known = given is not None and isinstance(row, int) and 0 <= row < len(given)
        g = int(given[row]) if known and given is not None else None
        d = self.log.record(make_decision(row, kind, label, g, self.data.n_rows))
        return self.state(d.row)

    def state(self, row: int) -> dict[str, Any]:
        """A row's current decision as the client shows it."""
        d = self.log.current.get(row)
        return {"row": row, "decision": "" if d is None else d.decision,
                "label": None if d is None else d.label, "badge": badge(d)}  # fmt: skip

    def states(self, rows_text: str) -> dict[str, Any]:
        """Current decisions of the listed rows (``"1,5,9"``, at most 1000)."""
        rows = [_int(v, "rows", 0, self.data.n_rows - 1) for v in rows_text.split(",") if v][:1000]
        return {"version": self.log.version, "decided": len(self.log.current),
                "rows": [self.state(r) for r in rows if r is not None]}  # fmt: skip


Handler = Callable[[Any], Awaitable[Any]]


def make_app(server: ReviewServer, allow_any_host: bool = False) -> Any:
    """The Starlette application serving ``server``'s pages and API.

    Args:
        server: the state and pages.
        allow_any_host: accept any ``Host`` header (when bound to a non-loopback address).
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    def guard(request: Request, *, changes_state: bool) -> Any:
        """``None`` when the request may proceed, else the refusal response."""
        host = (request.url.hostname or "").strip("[]")
        if not allow_any_host and host not in LOOPBACK:
            return PlainTextResponse(f"host {host!r} refused: open the app by 127.0.0.1", 400)
        if changes_state:
            sent = request.headers.get("x-tracin-token", "")
        else:
            sent = request.query_params.get("token") or request.cookies.get(server.cookie, "")
        if not secrets.compare_digest(sent.encode(), server.token.encode()):
            return PlainTextResponse(
                "403: this needs the review token; open the URL `tracin review` printed", 403
            )
        return None

    def page(render: Callable[[Request], str]) -> Callable[[Request], Any]:
        def endpoint(request: Request) -> Any:
            refused = guard(request, changes_state=False)
            if refused is not None:
                return refused
            if "token" in request.query_params:  # move the token from the URL to a cookie
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items()
                                  if k != "token"])  # fmt: skip
                response: Any = RedirectResponse(
                    request.url.path + ("?" + rest if rest else ""), 303
                )
                response.set_cookie(server.cookie, server.token, httponly=True, samesite="strict")
                return _secure(response)
            try:
                return _secure(HTMLResponse(render(request)))
            except TracInError as exc:
                return _secure(PlainTextResponse(str(exc), 404))

        return endpoint

    async def decide(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        refused = guard(request, changes_state=True)
        if refused is not None:
            return refused
        try:
            body = json.loads(await request.body())
            return _secure(JSONResponse(await run_in_threadpool(server.decide, body)))
        except (TracInError, ValueError) as exc:
            return _secure(JSONResponse({"error": str(exc)}, 400))

    def decisions(request: Request) -> Any:
        refused = guard(request, changes_state=False)
        if refused is not None:
            return refused
        try:
            return _secure(JSONResponse(server.states(request.query_params.get("rows", ""))))
        except TracInError as exc:
            return _secure(JSONResponse({"error": str(exc)}, 400))

    routes = [
        Route("/", page(lambda r: server.suspects(r.query_params))),
        Route("/example/{split}/{row:int}",
              page(lambda r: server.example_page(r.path_params["split"], r.path_params["row"],
                                                 r.query_params))),
        Route("/queries/{split}",
              page(lambda r: server.queries_page(r.path_params["split"], r.query_params))),
        Route("/api/decision", decide, methods=["POST"]),
        Route("/api/decisions", decisions),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]  # fmt: skip
    return Starlette(routes=routes)


def _secure(response: Any) -> Any:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one).

    Raises:
        ConfigError: the address cannot be bound (in use, or not this machine's).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port, "
            "or leave it out for a free one"
        ) from None
    sock.listen(128)
    return sock
