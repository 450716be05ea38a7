"""Which parameters are differentiated, and how checkpoint weights meet the user's model.

The user's model is never modified: checkpoint tensors are passed to
`torch.func.functional_call`, and the only change made (eval mode while gradients are taken) is
undone by `eval_mode` on exit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from tracin._errors import CheckpointError, ConfigError

__all__ = ["eval_mode", "fit_state", "select_parameters", "unwrap_model"]

_PREFIXES = ("module.", "_orig_mod.")


def select_parameters(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    """Names of the parameters to differentiate, in the model's own order.

    Args:
        model: the network.
        layers: module or parameter names (``"fc2"`` selects ``fc2.weight`` and ``fc2.bias``;
            ``"fc2.bias"`` only that one); ``None`` selects every parameter with
            ``requires_grad=True``.

    Raises:
        ConfigError: a name matches nothing (the error lists the names there are), or nothing
            is selected.
    """
    named = dict(model.named_parameters())
    if layers is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(layers, str):
            raise ConfigError(f"layers={layers!r} must be a list of names, e.g. [{layers!r}]")
        chosen = []
        for layer in layers:
            hits = [n for n in named if n == layer or n.startswith(layer + ".")]
            if not hits:
                modules = [m for m, mod in model.named_modules() if m and list(mod.parameters())]
                raise ConfigError(
                    f"layer {layer!r} matches no parameter of the model; modules with parameters "
                    f"are {modules[:20]}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        chosen = [n for n in named if n in chosen]
    if not chosen:
        raise ConfigError("no parameters selected: the model has no parameter with requires_grad")
    return chosen


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``nn.DataParallel``, ``DistributedDataParallel`` and ``torch.compile``.

    Wrappers nest in any order (``torch.compile(DDP(model))``); each is removed. Anything else,
    a non-module included, comes back as it is.
    """
    parallel = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(model, parallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _strip_prefix(
    state: Mapping[str, torch.Tensor], model_keys: set[str]
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key, in any nesting (``_orig_mod.module.``)."""
    out = dict(state)
    stripped = True
    while stripped and out and not (set(out) & model_keys):
        stripped = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                stripped = True
    return out


def fit_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors keyed like ``model.named_parameters()`` and ``named_buffers()``.

    Strips DataParallel/DDP ``module.`` (and ``torch.compile`` ``_orig_mod.``) prefixes, checks
    keys and shapes against the model, and casts to the model's dtypes and device.

    Raises:
        CheckpointError: missing or unexpected keys, or a shape mismatch, naming the first ones.
    """
    reference = model.state_dict()
    state = _strip_prefix(state, set(reference))
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; is it a checkpoint of this architecture?"
        )
    for key, ref in reference.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"checkpoint {where} does not fit the model: {key!r} has shape "
                f"{tuple(state[key].shape)} in the checkpoint, {tuple(ref.shape)} in the model"
            )
    out: dict[str, torch.Tensor] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        src = state.get(name, tensor)  # non-persistent buffers come from the model
        out[name] = src.detach().to(device=tensor.device, dtype=tensor.dtype)
    return out


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, restoring each one's own flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
