"""What every evaluation result does alike: save its JSON and plot, draw with Matplotlib."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_result"]


def save_result(
    directory: str | Path, stem: str, data: dict[str, Any], plot: Callable[[Path], Path]
) -> dict[str, Path]:
    """Write ``<stem>.json`` (``data``) and ``<stem>.png`` (``plot(path)``) into ``directory``.

    Returns:
        ``{"json": path, "plot": path}``.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=1))
    return {"json": out / f"{stem}.json", "plot": plot(out / f"{stem}.png")}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (plots are files here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
