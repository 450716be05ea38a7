"""Per-example gradients by a plain loop: one forward and one ``autograd.grad`` per example.

For each example x of a batch, g(x) = d f(w, x) / d w for the selected parameters w, flattened
and concatenated in the model's parameter order, exactly as
`tracin.gradients._functional.FunctionalEngine`
returns them. Slow (B backward passes per batch) and always right: it needs nothing of the model
but a forward pass that autograd can differentiate, so it runs models ``torch.func.vmap`` cannot
batch (``nn.GRU``/``nn.RNN`` on CPU, ``.item()`` or other data-dependent control flow). It is the
independent reference of the engine self-check (`tracin.gradients._selfcheck`) and the engine
``auto``
falls back to.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tracin._batch import Batch, batch_size, map_tensors, slice_batch
from tracin._errors import TaskError
from tracin.gradients._functional import DictGradients, ScoreFn, functional_model

__all__ = ["LoopEngine"]


class LoopEngine(DictGradients):
    """Exact per-example gradients, one ``torch.autograd.grad`` call per example.

    Args:
        model: the network (left unmodified; put in eval mode by the caller).
        names: parameter names to differentiate (see `select_parameters`), in model order.
    """

    def gradient_dict(
        self, weights: Mapping[str, torch.Tensor], score: ScoreFn, batch: Batch
    ) -> dict[str, torch.Tensor]:
        """Per-example gradients ``(B, numel)`` of each selected parameter, in model order.

        Raises:
            TaskError: ``score`` does not return one value for a batch of one example.
        """
        chosen = set(self.names)
        params = {
            n: w.detach().requires_grad_(n in chosen) if w.is_floating_point() else w
            for n, w in weights.items()
        }
        model = functional_model(self.model, params)
        wrt = [params[n] for n in self.names]
        rows: list[list[torch.Tensor]] = [[] for _ in self.names]
        n, distinct = batch_size(batch), _distinct_rows(batch)
        with torch.enable_grad():
            for i in range(distinct):
                out = score(model, slice_batch(batch, i, i + 1))
                if out.shape != (1,):
                    raise TaskError(
                        f"score returned shape {tuple(out.shape)} for a batch of one example; "
                        "expected (1,): return one unreduced value per example"
                    )
                grads = torch.autograd.grad(out[0], wrt, allow_unused=True)
                for j, (g, p) in enumerate(zip(grads, wrt, strict=True)):
                    rows[j].append((torch.zeros_like(p) if g is None else g).reshape(-1))
        for r in rows:  # a repeated last row (the padding of a short batch) is computed once
            r.extend([r[-1]] * (n - distinct))
        return {name: torch.stack(r) for name, r in zip(self.names, rows, strict=True)}


def _distinct_rows(batch: Batch) -> int:
    """How many leading rows to compute: the rest repeat the last of them exactly."""
    leaves: list[torch.Tensor] = []
    map_tensors(leaves.append, batch)
    n = batch_size(batch)
    last = n - 1
    while last > 0 and all(torch.equal(t[last - 1], t[n - 1]) for t in leaves):
        last -= 1
    return last + 1
