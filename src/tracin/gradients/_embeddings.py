"""Embeddings from the feature pass: the last checkpoint's forward already computed them.

A run stores each row's embedding-layer output at the last checkpoint (for embedding neighbors
beside proponents). That was one more forward pass over every split; on a last-layer run, whose
cost is forward passes, a quarter of the work with 3 checkpoints (``benchmarks/README.md``).
`EmbeddingCapture` keeps the layer's outputs while the last checkpoint's features are computed,
and `GradientSource.embed` writes them instead of running the model again. Only where that pass
runs the model once on the plain batch (the hooks with nothing left to torch.func or the loop:
their forwards run under vmap or per example), and up to a memory budget; any row not kept is
computed by the embedding pass as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tracin.gradients._factored import FactoredEngine

__all__ = ["EmbeddingCapture"]


class EmbeddingCapture:
    """One module's outputs at one checkpoint, kept by ``(split, first row)``.

    Args:
        model: the network.
        layer: the embedding module's name.
        checkpoint_id: the checkpoint whose pass is kept (the last one).
        max_bytes: the most bytes kept (float64 rows); past it, nothing more is kept.
    """

    def __init__(
        self, model: nn.Module, layer: str, checkpoint_id: str, max_bytes: int = 256 * 2**20
    ) -> None:
        self.module = dict(model.named_modules()).get(layer)
        self.checkpoint_id = checkpoint_id
        self.left = max_bytes
        self.kept: dict[tuple[str, int], torch.Tensor] = {}

    @contextmanager
    def during(self, engine: Any, checkpoint_id: str, rows: int) -> Iterator[list[torch.Tensor]]:
        """While ``engine`` computes a padded batch of ``rows``: the module's outputs, in order.

        Empty unless this is the kept checkpoint, the engine runs the model on the plain batch,
        and the budget is not spent. Outputs of other shapes (the self-check's few rows) and
        outputs inside torch.func transforms are skipped.
        """
        grabbed: list[torch.Tensor] = []
        inner = getattr(engine, "engine", engine)  # a projecting wrapper
        plain = isinstance(inner, FactoredEngine) and inner.rest is None
        if (
            self.module is None
            or checkpoint_id != self.checkpoint_id
            or not plain
            or self.left <= 0
        ):
            yield grabbed
            return

        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            wrapped = torch._C._functorch.is_functorch_wrapped_tensor  # vmap / grad tensors
            if isinstance(out, torch.Tensor) and out.shape[0] == rows and not wrapped(out):
                grabbed.append(out.detach().flatten(1).double())

        handle = self.module.register_forward_hook(hook)
        try:
            yield grabbed
        finally:
            handle.remove()

    def keep(self, split: str, start: int, grabbed: list[torch.Tensor], n: int) -> None:
        """Keep the last output's first ``n`` rows (before padding) as ``(split, start)``."""
        if not grabbed:
            return
        emb = grabbed[-1][:n].clone()
        self.left -= emb.numel() * emb.element_size()
        if self.left >= 0:
            self.kept[split, start] = emb

    def take(self, split: str, start: int, rows: int) -> torch.Tensor | None:
        """The kept rows ``start .. start + rows - 1`` of ``split`` (removed), or None."""
        emb = self.kept.pop((split, start), None)
        return emb if emb is not None and emb.shape[0] == rows else None
