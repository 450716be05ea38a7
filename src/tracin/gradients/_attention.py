"""``nn.MultiheadAttention``'s projections as hooked Linear layers.

``nn.MultiheadAttention`` never calls a Linear module: it passes its packed ``in_proj_weight``
(``(3E, E)``) and ``out_proj.weight`` to ``F.multi_head_attention_forward``, which calls
``F.linear`` on them (on row slices of the packed weight for cross-attention). Both are Linear
layers all the same: the per-example gradient is ``sum_t d_t a_t^T`` over the calls, which
`tracin.gradients._intercept` records while PyTorch's own attention code runs unchanged. A
call on rows ``[r, r + n)`` of the packed weight gets its output gradient padded with zeros to
the weight's ``3E`` rows; separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` != ``embed_dim``)
are three layers, each owning its third of the packed ``in_proj_bias``.
"""

from __future__ import annotations

from torch import nn

from tracin.gradients._projections import LinearStandIn, Projection

__all__ = ["attention_projections"]


def attention_projections(module: nn.Module) -> list[Projection]:
    """The hookable projections of an attention module (see `Projection`).

    Empty unless ``module`` is a plain ``nn.MultiheadAttention`` (its own forward). A packed
    ``in_proj_weight`` is one layer; separate ``q/k/v_proj_weight`` (``kdim``/``vdim`` !=
    ``embed_dim``) are three, each with its third of the packed ``in_proj_bias``.
    """
    if not isinstance(module, nn.MultiheadAttention) or not _own_mha_forward(module):
        return []
    out: list[Projection] = []
    bias = module._parameters.get("in_proj_bias")
    bias_name = "in_proj_bias" if bias is not None else None
    packed = module._parameters.get("in_proj_weight")
    if module._qkv_same_embed_dim and isinstance(packed, nn.Parameter):
        out.append(Projection("in_proj", "in_proj_weight", bias_name, LinearStandIn(packed, bias)))
    elif not module._qkv_same_embed_dim:
        e = module.embed_dim
        for i, side in enumerate("qkv"):
            weight = module._parameters.get(f"{side}_proj_weight")
            if isinstance(weight, nn.Parameter):
                stand_in = LinearStandIn(weight, None)
                out.append(Projection(f"{side}_proj", f"{side}_proj_weight", bias_name, stand_in,
                                      bias_start=i * e, bias_rows=3 * e))  # fmt: skip
    proj = module.out_proj
    if isinstance(proj._parameters.get("weight"), nn.Parameter):
        out_bias = "out_proj.bias" if proj.bias is not None else None
        out.append(Projection("out_proj", "out_proj.weight", out_bias, proj))
    return out


def _own_mha_forward(module: nn.Module) -> bool:
    return "forward" not in vars(module) and (type(module).forward is nn.MultiheadAttention.forward)
