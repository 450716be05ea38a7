"""Checkpoints: role 1 of the data flow (DESIGN.md section 2).

Contract: a checkpoint is an explicit value: where its weights are (a file read with
``torch.load(weights_only=True)`` or a state dict), its training step, and the learning rate
(one number, or one per parameter group) that TracInCP weights it by. Nothing here computes a
gradient. `CheckpointRecorder` and the Hugging Face / Lightning callbacks write checkpoints where
training happens; ``TracInTrainerCallback`` (Hugging Face ``Trainer``, extra ``[hf]``) and
``TracInLightningCallback`` (extra ``[lightning]``) are built on first access, so their frameworks
stay optional (and they are not in ``__all__``: a star import would need both frameworks).

A new way to obtain checkpoints (another framework's callback) goes here.
"""

from typing import Any

from tracin.checkpoints._checkpoints import Checkpoint, Checkpoints
from tracin.checkpoints._recorder import CheckpointRecorder, log_spaced_steps

__all__ = [
    "Checkpoint",
    "CheckpointRecorder",
    "Checkpoints",
    "log_spaced_steps",
]

_CALLBACKS = {"TracInTrainerCallback": "trainer", "TracInLightningCallback": "lightning"}


def __getattr__(name: str) -> Any:
    """Build the optional framework callbacks on first access (their packages are extras)."""
    if name in _CALLBACKS:
        from tracin.checkpoints import _callbacks

        if _CALLBACKS[name] == "trainer":
            return _callbacks.trainer_callback_class()
        return _callbacks.lightning_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
