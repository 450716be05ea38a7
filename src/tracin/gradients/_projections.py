"""A projection of a module that calls ``F.linear`` on its own weights, as a hooked Linear layer.

Modules such as ``nn.MultiheadAttention`` (`tracin.gradients._attention`) and the recurrent
layers (`tracin.gradients._recurrent`) never call a Linear module; their weights are Linear
layers all the same. `Projection` names one such layer and `LinearStandIn` gives it a shape;
`tracin.gradients._intercept` records its calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["LinearStandIn", "Projection"]


@dataclass(frozen=True)
class Projection:
    """One projection of an attention module, as a Linear layer.

    Attributes:
        name: the layer's name relative to the module (``"in_proj"``, ``"q_proj"``...).
        weight: the weight's parameter name relative to the module.
        bias: the bias's parameter name, or None.
        linear: a Linear with the layer's shape (``out, in``).
        bias_start: the layer's first row in the bias (a third of a packed ``in_proj_bias``).
        bias_rows: the bias's size when the layer owns only ``[bias_start, bias_start + out)``.
    """

    name: str
    weight: str
    bias: str | None
    linear: nn.Linear
    bias_start: int = 0
    bias_rows: int | None = None


class LinearStandIn(nn.Linear):
    """An ``nn.Linear`` that is never called: the shape and parameters of a packed projection.

    Args:
        weight: the projection's weight ``(out, in)`` (the module's own parameter, not a copy).
        bias: its bias ``(out,)`` or None.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight = weight
        self.register_parameter("bias", bias)
