"""The last checkpoint's feature pass keeps the embedding layer's outputs: no second forward.

Stored and streaming runs: embeddings equal the layer's output at the last checkpoint (an
independent forward), and the model runs no more forwards than a run without embeddings.
Where the pass runs under torch.func (the functional engine), the embedding pass runs as before.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import tracin
from conftest import checkpoints


def _forwards(model):
    calls = []
    handle = model[0].register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    return calls, handle


@pytest.mark.parametrize("store", [False, True])
@pytest.mark.parametrize("engine", ["auto", "functional"])
def test_embeddings_come_from_the_feature_pass(mlp_setup, tmp_path, store, engine):
    model, train, _, states = mlp_setup
    kwargs = {"store": tmp_path / "r", "proj_dim": 16, "block_rows": 8} if store else {}
    counts = {}
    for layer in ("1", None):
        calls, handle = _forwards(model)
        run = tracin.featurize(
            model, tracin.ClassificationTask(), checkpoints(states), TensorDataset(*train),
            embedding_layer=layer, engine=engine, overwrite=True, **kwargs,
        )  # fmt: skip
        handle.remove()
        counts[layer] = len(calls)
        if layer is not None:
            net = type(model)(*model).double()
            net.load_state_dict(states[-1])
            with torch.no_grad():
                expected = net[1](net[0](train[0])).numpy()
            np.testing.assert_allclose(run.embeddings("train"), expected, rtol=1e-6)  # float32
    if engine == "auto":  # the hooks: the embeddings cost no forward pass of their own
        assert counts["1"] == counts[None]
    else:  # torch.func's forwards run under vmap: the embedding pass runs its own
        assert counts["1"] > counts[None]
