"""Hugging Face BERT under both engines: padding never changes a review's features, the factored
engine equals torch.func on it in float64, ClassificationTask(output='logits') reads ModelOutput."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import tracin

transformers = pytest.importorskip("transformers")

EXAMPLE = Path(__file__).parents[1] / "examples" / "text_classification.py"


def _example():
    spec = importlib.util.spec_from_file_location("text_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, num_labels=2, pad_token_id=0,
        attn_implementation="eager", hidden_dropout_prob=0.3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double()


def _padded(length):
    """Three reviews of 5, 3 and 7 tokens ([CLS]=2 first), padded with 0 to ``length``."""
    rows = [[2, 5, 9, 11, 7], [2, 13, 4], [2, 8, 8, 21, 3, 17, 6]]
    ids = torch.zeros(3, length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.tensor([1, 0, 1]),
    }


def _features(model, task, engine, layers, batch):
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[0.5])
    run = tracin.featurize(model, task, ckpts, _padded(8), engine=engine, layers=layers,
                           dtype="float64")  # fmt: skip
    return run.query_features(batch)[0]


@pytest.mark.parametrize(
    ("engine", "layers"),
    [("functional", None), ("factored", None), ("auto", ["bert.pooler", "classifier"]),
     ("auto", ["bert.embeddings"])],
)  # fmt: skip
def test_padding_does_not_change_features(engine, layers):
    model, task = _bert(), _example().BertTask(output="logits")
    short, long = (_features(model, task, engine, layers, _padded(n)) for n in (8, 14))
    assert short.shape == long.shape and short.abs().sum() > 0
    torch.testing.assert_close(short, long, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [None, ["bert.embeddings.word_embeddings", "classifier"]])
def test_factored_equals_functional_on_bert(layers):
    model, task = _bert(), _example().BertTask(output="logits")
    batch = _padded(10)
    functional = _features(model, task, "functional", layers, batch)
    factored = _features(model, task, "factored", layers, batch)
    torch.testing.assert_close(factored, functional, rtol=1e-9, atol=1e-12)


def test_classification_task_takes_model_output_logits():
    model = _bert().eval()
    batch = _padded(8)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert not isinstance(out, torch.Tensor)
    with pytest.raises(tracin.TaskError, match="output='logits'"):
        tracin.ClassificationTask().train_loss(model, batch)
    task = tracin.ClassificationTask(output="logits")
    expected = torch.nn.functional.cross_entropy(out.logits, batch["labels"], reduction="none")
    torch.testing.assert_close(task.train_loss(model, batch), expected)
    tracin.check_task(task, model, batch)


def test_factored_engine_refuses_sequence_first_layers():
    class SeqFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 4) -> a Linear on (T, B, 4)
            return self.lin(x.transpose(0, 1)).mean(0)

    model = SeqFirst()
    x, y = torch.randn(3, 5, 4), torch.tensor([0, 1, 1])
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()], lr=[1.0])
    with pytest.raises(
        tracin.TaskError,
        match=r"'lin' got input of shape \(5, \d+, 4\).*examples along the first dimension",
    ):
        tracin.featurize(model, tracin.ClassificationTask(), ckpts, (x, y), engine="factored")
    run = tracin.featurize(model, tracin.ClassificationTask(), ckpts, (x, y), engine="functional")
    assert run.self_influence().shape == (3,)
