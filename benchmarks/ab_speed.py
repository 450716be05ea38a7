"""A/B of exact self-influence speed between two source trees, in one machine state.

    git worktree add /tmp/old ef3ce13          # the tree before the exactness work
    for i in 1 2; do for m in democnn text_linear text_mha; do
      python benchmarks/ab_speed.py /tmp/old/src $m; python benchmarks/ab_speed.py src $m
    done; done

Prints checkpoint-rows/s of ``featurize(...).self_influence()`` (engine auto, batch 256, 2
threads, best of 3 after a warm-up) for the tracin found under the given ``src`` folder: DemoCNN
on 7,188 random 8x8 images x 3 checkpoints, or the benchmark's text_linear / text_mha model on
1,024 (or argv[3]) token rows x 2 checkpoints.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> None:
    """Time one model with the tracin of ``sys.argv[1]``."""
    src, name = sys.argv[1], sys.argv[2]
    sys.path.insert(0, src)
    sys.path.insert(0, str(Path(__file__).parent))
    import tracin
    from tracin.experiments import DemoCNN

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    if name == "democnn":
        model: torch.nn.Module = DemoCNN().eval()
        x, y = torch.randn(7188, 1, 8, 8, generator=g), torch.randint(0, 10, (7188,), generator=g)
        lrs = [0.1, 0.1, 0.01]
    else:
        from engines import TextLinear, TextMHA, text

        model = (TextMHA if name == "text_mha" else TextLinear)().eval()
        x, y = text(int(sys.argv[3]) if len(sys.argv) > 3 else 1024)
        lrs = [0.1, 0.01]
    data = torch.utils.data.TensorDataset(x, y)
    ckpts = tracin.Checkpoints.from_state_dicts([model.state_dict()] * len(lrs), lr=lrs)

    def run() -> float:
        start = time.perf_counter()
        tracin.featurize(model, tracin.ClassificationTask(), ckpts, data, batch_size=256)
        return time.perf_counter() - start

    run()
    best = min(run() for _ in range(3))
    print(f"{src} {name}: {len(x) * len(lrs) / best:.0f} checkpoint-rows/s ({best:.3f} s)")


if __name__ == "__main__":
    main()
