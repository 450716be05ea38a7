"""Engine self-check: before the first batch is featurized, verify the engine on a few rows.

The fast engines are exact only when their assumptions hold: the factored engine sees a
parameter's uses only through the hooked module's calls (a tied weight, or a weight used through
``F.linear`` outside its module, is missed), and ``torch.func.vmap`` cannot batch every module
(``nn.GRU``/``nn.RNN`` on CPU, ``.item()``, data-dependent control flow). The check takes the
first `CHECK_ROWS` rows of the first batch at the first checkpoint and compares, per parameter,
the Gram matrix ``G_p = g_p g_p^T`` of the engine's exact per-example gradients with that of an
independent reference (`tracin.gradients._loop.LoopEngine`, one ``autograd.grad`` per example), and
the
engine's own squared norms with the reference's. The error of parameter ``p`` is
``max |G_p - G_p^ref| / max diag G_p^ref`` (cross products relative to the squared norms).

On a mismatch or a failure, ``engine="auto"`` moves the parameters at fault to an engine that is
right (hooked layers to torch.func, torch.func to the loop) and says so once with a
`TracInWarning`; an engine chosen by name is refused with an `EngineError` naming the parameters,
the modules that use them, and the engine that works. Cost: ``2 * CHECK_ROWS`` examples through
the engine and ``CHECK_ROWS`` backward passes, once per run.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from tracin._batch import Batch, batch_size, slice_batch
from tracin._errors import EngineError, HookError, TracInError, TracInWarning
from tracin.gradients import _functional, _loop
from tracin.gradients._functional import FeatureEngine, ScoreFn
from tracin.gradients._loop import LoopEngine

__all__ = [
    "CHECK_ROWS",
    "EngineChoice",
    "engine_failure_hint",
    "failing_module",
    "verify_engine",
]

CHECK_ROWS = 3
"""Rows of the first batch the engine is checked on."""

_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 2e-4,
    torch.float16: 5e-2,
    torch.bfloat16: 1e-1,
}


@dataclass(frozen=True)
class EngineChoice:
    """How an engine is built after the self-check.

    Attributes:
        exclude: parameters the factored engine must not hook (computed by ``rest`` instead).
        rest: engine for everything not hooked: ``"functional"`` (torch.func) or ``"loop"``.
    """

    exclude: tuple[str, ...] = ()
    rest: str = "functional"


Builder = Callable[[EngineChoice, bool], FeatureEngine]
"""``build(choice, exact)``: the engine for ``choice``; ``exact=True`` without projection."""


def failing_module(exc: BaseException, model: nn.Module) -> str | None:
    """``"'name' (Type)"`` of the innermost module of ``model`` in ``exc``'s traceback."""
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    found: str | None = None
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            obj = tb.tb_frame.f_locals.get("self")
            if isinstance(obj, nn.Module) and id(obj) in names:
                found = f"{names[id(obj)] or '<root>'!r} ({type(obj).__name__})"
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return found


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _users(model: nn.Module, name: str) -> list[str]:
    """Every module that holds parameter ``name``'s tensor (tied weights have several)."""
    target = dict(model.named_parameters()).get(name)
    return [
        f"{mod or '<root>'} ({type(module).__name__})"
        for mod, module in model.named_modules(remove_duplicate=False)
        for p in module.parameters(recurse=False)
        if p is target
    ]


def _hooked(engine: Any) -> set[str]:
    inner = getattr(engine, "engine", engine)  # a projecting wrapper
    return {n for layer in getattr(inner, "layers", []) for n in (layer.weight, layer.bias) if n}


def _inside_functional(exc: BaseException) -> bool:
    """Whether ``exc`` was raised inside a torch.func engine (not in the hooks)."""
    files = {_functional.__file__, _loop.__file__}
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in files:
            return True
        tb = tb.tb_next
    return False


def _gram(g: torch.Tensor) -> torch.Tensor:
    g = g.detach().to(torch.float64)
    return g @ g.T


def _errors(ref: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> dict[str, float]:
    grams = {n: _gram(g) for n, g in ref.items()}
    floor = 1e-8 * max(float(torch.diagonal(g).max()) for g in grams.values()) + 1e-300
    out = {}
    for name, ref_gram in grams.items():
        scale = max(float(torch.diagonal(ref_gram).max()), floor)
        out[name] = float((_gram(got[name]) - ref_gram).abs().max()) / scale
    return out


def _split(feats: torch.Tensor, names: Sequence[str], sizes: Mapping[str, int]) -> dict[str, Any]:
    out, start = {}, 0
    for n in names:
        out[n] = feats[:, start : start + sizes[n]]
        start += sizes[n]
    return out


@dataclass
class _Attempt:
    engine: FeatureEngine | None = None
    bad: dict[str, float] | None = None
    failure: BaseException | None = None


def _attempt(
    build: Builder,
    choice: EngineChoice,
    names: Sequence[str],
    sizes: Mapping[str, int],
    ref: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    score: ScoreFn,
    rows: Batch,
    tol: float,
) -> _Attempt:
    try:
        twin = build(choice, True)
        feats, sq_twin = twin.features(weights, score, rows, 0)
        got = _split(feats, names, sizes)
        engine = build(choice, False)
        sq_feats = sq_twin if engine is twin else engine.features(weights, score, rows, 0)[1]
        sq = engine.sqnorms(weights, score, rows)
    except HookError as exc:  # a layer the hooks cannot do here: its parameters go elsewhere
        return _Attempt(engine=build(choice, False), bad=dict.fromkeys(exc.params, np.inf),
                        failure=exc)  # fmt: skip
    except TracInError:
        raise
    except Exception as exc:  # torch.func (or the hooks) cannot run this model
        if not _inside_functional(exc):  # the hooks failed: every hooked layer goes elsewhere
            engine = build(choice, False)
            return _Attempt(engine=engine, bad=dict.fromkeys(_hooked(engine), np.inf),
                            failure=exc)  # fmt: skip
        return _Attempt(failure=exc)
    errors = _errors(ref, got)
    bad = {n: e for n, e in errors.items() if not e <= tol}
    truth = sum(g.detach().double().pow(2).sum(1) for g in ref.values())
    assert isinstance(truth, torch.Tensor)
    for value in (sq_feats, sq):
        err = float(
            ((value.double().cpu() - truth.cpu()).abs() / truth.abs().max().clamp_min(1e-300)).max()
        )
        if not bad and not err <= tol:  # the norms' own path disagrees: blame the hooked layers
            bad = {n: err for n in sorted(_hooked(engine)) or names}
    return _Attempt(engine=engine, bad=bad)


def verify_engine(
    model: nn.Module,
    engine_name: str,
    names: Sequence[str],
    build: Builder,
    weights: Mapping[str, torch.Tensor],
    score: ScoreFn,
    batch: Batch,
    start: EngineChoice | None = None,
) -> FeatureEngine:
    """The engine to use: ``build(EngineChoice(), False)`` if it is right on ``batch``'s first rows.

    Args:
        model: the network (eval mode).
        engine_name: the engine the user chose (``"auto"`` may be changed; others are refused).
        names: the selected parameter names, in model order.
        build: makes the engine for an `EngineChoice` (see `Builder`).
        weights: the first checkpoint's tensors.
        score: the per-example score being featurized.
        batch: the first batch (on the model's device).
        start: the choice to start from (default: hook everything hookable, torch.func for the
            rest); a run that met a layer the hooks cannot do on a later batch starts from the
            choice it had, with that layer excluded.

    Raises:
        EngineError: the engine named by ``engine_name`` is wrong or cannot run on this model;
            the message names the parameters and modules at fault and the engine that works.
    """
    rows = slice_batch(batch, 0, min(CHECK_ROWS, batch_size(batch)))
    ref = LoopEngine(model, names).gradient_dict(weights, score, rows)
    params = dict(model.named_parameters())
    sizes = {n: params[n].numel() for n in names}
    tol = _TOLERANCE.get(params[names[0]].dtype, 1e-4)
    choice, notices = start or EngineChoice(), []
    for _ in range(len(names) + 2):
        result = _attempt(build, choice, names, sizes, ref, weights, score, rows, tol)
        if isinstance(result.failure, HookError) and result.failure.quiet and result.bad:
            choice = replace(choice, exclude=(*choice.exclude, *result.bad))  # as before: no notice
            continue
        if isinstance(result.failure, HookError) and engine_name != "auto":
            raise result.failure
        if result.failure is not None and result.bad and engine_name != "auto":
            raise EngineError(
                f"engine={engine_name!r} cannot compute {sorted(result.bad)[:5]} on this model: "
                f"{_first_line(result.failure)}. Pass engine='auto' (it computes them another "
                "way) or engine='loop'"
            ) from result.failure
        if result.failure is not None and not result.bad:
            where = failing_module(result.failure, model) or "the model"
            reason = f"{where} cannot be batched: {_first_line(result.failure)}"
            if engine_name != "auto" or choice.rest == "loop":
                raise EngineError(
                    f"engine={engine_name!r} cannot compute per-example gradients of this model: "
                    f"{reason}. Pass engine='loop' (one backward per example: slow, exact) or "
                    "engine='auto' (falls back by itself)"
                ) from result.failure
            choice = replace(choice, rest="loop")
            notices.append(f"{reason}; its parameters are computed one example at a time")
            continue
        if not result.bad:
            assert result.engine is not None
            if notices:
                text = "; then ".join(notices[:3])
                if len(notices) > 3:
                    text += f"; and {len(notices) - 3} more like them"
                warnings.warn(f"tracin engine 'auto': {text}", TracInWarning, stacklevel=4)
            return result.engine
        assert result.bad is not None
        described = "; ".join(
            f"{n} (used by {', '.join(_users(model, n)) or 'no module'}; relative error {e:.2g})"
            for n, e in list(result.bad.items())[:5]
        )
        if result.failure is not None:
            described = f"{_first_line(result.failure)} ({sorted(result.bad)[:5]})"
        if engine_name != "auto":
            raise EngineError(
                f"engine={engine_name!r} gets the per-example gradient wrong for {described}: a "
                "weight used outside its module's call (tied weights, F.linear on another "
                "module's weight) or a module the engine cannot batch. Pass engine='auto' (it "
                "routes those parameters to an exact engine) or engine='loop'"
            )
        newly = [n for n in result.bad if n in _hooked(result.engine) and n not in choice.exclude]
        if newly:
            choice = replace(choice, exclude=(*choice.exclude, *newly))
            notices.append(f"{described}: computed by torch.func instead of layer hooks")
        elif choice.rest != "loop":
            choice = replace(choice, rest="loop")
            notices.append(f"{described}: computed one example at a time")
        else:
            break
    raise EngineError(
        f"no engine reproduces the per-example gradients of this model on its first rows "
        f"(last mismatch: {described}); this is a bug in tracin, please report it"
    )


def engine_failure_hint(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a limit of ``torch.func`` rather than of the data."""
    text = f"{type(exc).__name__} {exc}".lower()
    keys = ("vmap", "functorch", "batching rule", "batchedtensor", "data-dependent", ".item()")
    return any(k in text for k in keys)
