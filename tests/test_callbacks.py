"""Framework callbacks: Hugging Face Trainer and Lightning record checkpoints whose learning rates
are the scheduler's lr after each saved step, read back with no hand-written list."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import tracin
from tracin.checkpoints import _callbacks


class _Tiny(nn.Module):
    """A model the HF Trainer can train: dict batch in, {"loss", "logits"} out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, labels=None):
        logits = self.head(self.norm(torch.tanh(self.body(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _rows(n=24):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 3, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def test_trainer_callback_records_linear_schedule(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = _Tiny()
    steps = [1, 2, 4, 7]
    callback = tracin.TracInTrainerCallback(tmp_path / "ckpts", steps=steps, save_optimizer=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=10, per_device_train_batch_size=4,
        learning_rate=0.1, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.01,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_rows(),
                                   callbacks=[callback])  # fmt: skip
    trainer.train()
    ckpts = callback.checkpoints()
    assert [c.step for c in ckpts] == steps
    # linear decay from 0.1 to 0 over 10 steps: after step s the next update uses 0.1 (10 - s) / 10
    assert ckpts.lrs == pytest.approx([0.1 * (10 - s) / 10 for s in steps])
    payload = ckpts[-1].payload()
    names = payload["optimizer_param_names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert names != [n for n, _ in model.named_parameters()]  # the Trainer's no-decay group
    assert set(payload["optimizer_state_dict"]["state"]) == set(range(len(names)))
    # the last checkpoint holds the weights of step 7, not the final model
    final = model.state_dict()
    assert not torch.equal(ckpts[-1].state_dict()["head.weight"], final["head.weight"])


class _Module:
    """Built lazily: Lightning is imported only by the test that needs it."""

    @staticmethod
    def make(pl):
        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

            def training_step(self, batch, batch_idx):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                opt = torch.optim.SGD(self.parameters(), lr=0.2)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
                return {"optimizer": opt,
                        "lr_scheduler": {"scheduler": sched, "interval": "step"}}  # fmt: skip

        return Module()


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_records_step_schedule(tmp_path, accumulate):
    pl = pytest.importorskip("lightning.pytorch")
    torch.manual_seed(0)
    module = _Module.make(pl)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, generator=gen),
                                          torch.randint(0, 2, (64,), generator=gen))  # fmt: skip
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    callback = tracin.TracInLightningCallback(tmp_path / "ckpts", every=3)
    trainer = pl.Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
        accumulate_grad_batches=accumulate,
    )  # fmt: skip
    trainer.fit(module, loader)
    ckpts = callback.checkpoints()
    assert [c.step for c in ckpts] == [3, 6]
    # LambdaLR 1 / (1 + s): after s steps, the next update uses 0.2 / (1 + s)
    assert ckpts.lrs == pytest.approx([0.2 / 4, 0.2 / 7])
    assert set(ckpts[0].state_dict()) == set(module.state_dict())


@pytest.mark.parametrize(
    ("attr", "blocked", "extra"),
    [("TracInTrainerCallback", ["transformers"], "hf"),
     ("TracInLightningCallback", ["lightning.pytorch", "pytorch_lightning"], "lightning")],
)  # fmt: skip
def test_missing_extra_names_the_install(monkeypatch, attr, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    _callbacks.trainer_callback_class.cache_clear()
    _callbacks.lightning_callback_class.cache_clear()
    try:
        with pytest.raises(
            tracin.MissingDependencyError, match=rf"pip install 'tracin\[{extra}\]'"
        ):
            getattr(tracin, attr)
    finally:
        _callbacks.trainer_callback_class.cache_clear()
        _callbacks.lightning_callback_class.cache_clear()


def test_import_tracin_imports_no_framework():
    code = ("import sys, tracin; bad = [m for m in ('transformers', 'lightning', "
            "'pytorch_lightning') if m in sys.modules]; assert not bad, bad")  # fmt: skip
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        tracin.Nope  # noqa: B018
