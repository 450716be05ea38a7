"""Record checkpoints from Hugging Face's ``Trainer`` and from Lightning, like `CheckpointRecorder`.

Both callbacks write the `CheckpointRecorder` format (``step_<n>.pt`` holding
``{"model_state_dict", "step", "lr"}``, optionally the optimiser's state) through the same
atomic `save_checkpoint`, at the steps chosen with ``steps=[...]`` (e.g. `log_spaced_steps`) or
``every=N``. They save after the optimiser's and the scheduler's step, so the recorded lr is the
one in force for the updates that follow the checkpoint, as TracInCP needs; ``.checkpoints()``
reads them back with no hand-written list of learning rates. When the optimiser's parameter groups
have different lrs (layer-wise decay), each group's lr is saved with its parameter names and
scoring weights each group by its own lr (see `tracin.checkpoints._recorder.recorded_lr`).

``transformers`` and ``lightning`` are optional: the classes are built on first use, and a
missing package is a `ConfigError` naming the extra to install. ``import tracin`` imports neither.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any

from tracin._errors import ConfigError, MissingDependencyError
from tracin.checkpoints._recorder import CheckpointRecorder

__all__ = ["lightning_callback_class", "trainer_callback_class"]


def _require(modules: tuple[str, ...], what: str, extra: str) -> ModuleType:
    """The first of ``modules`` that imports, or a `ConfigError` naming the extra to install."""
    for name in modules:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError(
        f"tracin.{what} needs {modules[0].split('.')[0]}, which is not installed: "
        f"pip install 'tracin[{extra}]'"
    )


@functools.cache
def trainer_callback_class() -> type:
    """The ``TracInTrainerCallback`` class (a ``transformers.TrainerCallback``)."""
    base: Any = _require(("transformers",), "TracInTrainerCallback", "hf").TrainerCallback

    class TracInTrainerCallback(base, CheckpointRecorder):  # type: ignore[misc]
        """Save TracIn checkpoints from a Hugging Face ``Trainer`` at the chosen steps.

        Pass it in ``Trainer(callbacks=[...])``. It saves in ``on_step_end``, after the
        optimiser's and the scheduler's step, using ``state.global_step`` as the step (optimiser
        updates, not micro-batches) and only on the main process.

        Args:
            directory: where ``step_<n>.pt`` files go.
            steps: the steps to save at (e.g. `log_spaced_steps`); ``None`` with ``every``.
            every: save every ``every`` steps instead.
            save_optimizer: also store the optimiser's state (Adam moments, for
                ``featurize(..., precondition="adam")``).
        """

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            """Save if ``state.global_step`` is a chosen step."""
            if state.is_world_process_zero:
                model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
                if model is None or optimizer is None:
                    raise ConfigError(
                        "TracInTrainerCallback.on_step_end got no model or optimizer: "
                        "use it as a Trainer callback, Trainer(callbacks=[...])"
                    )
                self.step(model, optimizer, int(state.global_step))
            return control

    return _public(TracInTrainerCallback)


@functools.cache
def lightning_callback_class() -> type:
    """The ``TracInLightningCallback`` class (a Lightning ``Callback``)."""
    pl = _require(("lightning.pytorch", "pytorch_lightning"), "TracInLightningCallback",
                  "lightning")  # fmt: skip
    base: Any = pl.Callback

    class TracInLightningCallback(base, CheckpointRecorder):  # type: ignore[misc]
        """Save TracIn checkpoints from a Lightning ``Trainer`` at the chosen steps.

        Pass it in ``Trainer(callbacks=[...])``. It saves in ``on_train_batch_end``, which
        Lightning calls after the optimiser's and the step-interval schedulers' step; the step is
        ``trainer.global_step`` (optimiser updates), saved once per step with gradient
        accumulation, and only on global rank zero. One optimiser only.

        Args:
            directory: where ``step_<n>.pt`` files go.
            steps: the steps to save at (e.g. `log_spaced_steps`); ``None`` with ``every``.
            every: save every ``every`` steps instead.
            save_optimizer: also store the optimiser's state (Adam moments, for
                ``featurize(..., precondition="adam")``).
        """

        _last_step = -1  # the step saved last (an instance attribute once set)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            """Save if ``trainer.global_step`` is a chosen step not saved yet."""
            step = int(trainer.global_step)  # 0 while accumulating the first step's micro-batches
            if step < 1 or step == self._last_step or not trainer.is_global_zero:
                return
            self._last_step = step
            if not self.wants(step):
                return
            optimizers = trainer.optimizers
            if len(optimizers) != 1:
                raise ConfigError(
                    f"TracInLightningCallback needs one optimiser, the trainer has "
                    f"{len(optimizers)}; record checkpoints yourself with CheckpointRecorder"
                )
            self.save(pl_module, optimizers[0], step)

    return _public(TracInLightningCallback)


def _public(cls: type) -> type:
    """Name a class built here as ``tracin.<name>`` (its repr, and pickling via the package)."""
    cls.__module__ = "tracin"
    cls.__qualname__ = cls.__name__
    return cls
