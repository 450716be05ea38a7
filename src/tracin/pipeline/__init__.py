"""The pipeline: featurize (model + data -> store -> `tracin.Run`) and open (store -> run).

Contract: `featurize` is the only step that touches the model and the data: it checks the
arguments, plans the store, takes a lock, verifies the engine, and writes each missing block of
each (split, checkpoint), so an interrupted run resumes; under ``torchrun`` each process writes its
share of the blocks. `open` reads a store without the model. `TracInIdeal` accumulates the exact
influence at every optimiser step of a training loop (the paper's TracIn-ideal).
"""

from tracin.pipeline._api import featurize
from tracin.pipeline._ideal import TracInIdeal
from tracin.pipeline._open import open

__all__ = ["TracInIdeal", "featurize", "open"]
