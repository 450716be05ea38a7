"""The examples behind row numbers, as a notebook cell shows them: label, image, text or row.

An `ExampleSource` reads row ``i`` of a split from a Dataset, a DataLoader, a list of examples or
an in-memory batch, through the run's task (which item is the input and which the label), or
from the user's ``render(split, index)`` (the report spec's contract, `tracin._spec`). A value
becomes a `Shown` cell: a string is text; an ``(H, W)``, ``(H, W, 3|4)`` or ``(C, H, W)`` numeric
array is an image, encoded here as a PNG data URI (RFC 2083, no Matplotlib), at most `THUMB`
pixels a side; other arrays show their first values; a dict is a table row. Strings are
returned raw: escaping is the caller's (`tracin.display._tables`).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from tracin._errors import ConfigError, TaskError

if TYPE_CHECKING:
    from tracin._task import Task

__all__ = [
    "image_array",
    "TEXT_CHARS",
    "THUMB",
    "ExampleSource",
    "Renderer",
    "Shown",
    "as_array",
    "clip",
    "example_at",
    "plain",
    "png_uri",
    "readable",
    "row_count",
    "shown_item",
]

THUMB = 64  # largest side of a thumbnail's PNG, pixels
TEXT_CHARS = 160  # characters of a text example kept
ROW_ITEMS = 6  # columns of a table-row example kept

Renderer = Callable[[str, int], Mapping[str, Any]]


class Shown(NamedTuple):
    """One example as a cell shows it; each part may be missing."""

    label: Any = None
    image: str | None = None
    text: str | None = None
    row: Mapping[str, str] | None = None


# --- examples -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExampleSource:
    """Where the examples behind row numbers are.

    Attributes:
        train: the training rows: a Dataset, a DataLoader (its ``dataset``), a list of
            examples, or one in-memory batch (a tensor, or a tuple or dict of tensors, rows
            along dim 0).
        render: ``render(split, index) -> {"label", "image" | "text" | "row"}``, the spec's
            contract (`tracin._spec`); it wins over ``train`` and ``queries``.
        labels: ``(N,)`` given labels of the training rows, winning over the data's own.
        classes: class names, indexed by label (a sequence or a mapping).
        queries: ``{split: data}`` of stored query splits, as ``train``.
        task: the run's task: which item of an example is the input and which the label.
    """

    train: Any = None
    render: Renderer | None = None
    labels: np.ndarray | None = None
    classes: Sequence[str] | Mapping[Any, str] | None = None
    queries: Mapping[str, Any] = field(default_factory=dict)
    task: Task | None = None

    def example(self, split: str, row: int) -> Shown:
        """Row ``row`` of ``split`` for a cell (``Shown()`` when the data is unknown)."""
        if self.render is not None:
            return self._named(_from_render(self.render, split, row), split, row)
        data = self.train if split == "train" else self.queries.get(split)
        if not readable(data):
            return Shown(self._given(split, row))
        shown = shown_item(example_at(data, row), self.task)
        return self._named(shown, split, row)

    def label(self, row: int) -> Any:
        """The given label of training row ``row`` (a class name when known), or ``None``."""
        if self.labels is not None:
            return self.name(plain(self.labels[row]))
        if self.render is not None:
            return self.name(_render_view(self.render, "train", row)["label"])
        if not readable(self.train):
            return None
        return self.name(_split_item(example_at(self.train, row), self.task)[1])

    def labels_of(self, rows: np.ndarray) -> list[Any]:
        """Given labels of training ``rows`` (``None`` where unknown); one read if possible."""
        column = self._label_column()
        if column is not None:
            return [self.name(plain(column[int(r)])) for r in rows]
        return [self.label(int(r)) for r in rows]

    def _label_column(self) -> np.ndarray | None:
        if self.labels is not None:
            return np.asarray(self.labels)
        if self.render is not None or not readable(self.train):
            return None
        data = getattr(self.train, "dataset", self.train)
        batch = tuple(data.tensors) if isinstance(data, torch.utils.data.TensorDataset) else data
        if not _is_batch(batch):
            return None
        value = _split_item(batch, self.task)[1]
        return None if value is None else as_array(value)

    def _given(self, split: str, row: int) -> Any:
        return self.label(row) if split == "train" else None

    def _named(self, shown: Shown, split: str, row: int) -> Shown:
        if split == "train" and self.labels is not None:
            return shown._replace(label=self.label(row))
        return shown._replace(label=self.name(plain(shown.label)))

    def name(self, label: Any) -> Any:
        """``label`` as its class name when ``classes`` has one, else unchanged."""
        if self.classes is None or label is None:
            return label
        try:
            return self.classes[label]
        except (IndexError, KeyError, TypeError):
            return label


def readable(data: Any) -> bool:
    """True when rows of ``data`` can be read by index (not ``None``, not an iterable dataset)."""
    data = getattr(data, "dataset", data)
    if data is None or isinstance(data, torch.utils.data.IterableDataset):
        return False
    return hasattr(data, "__getitem__")


def _is_batch(data: Any) -> bool:
    """True for a tensor/array, or a tuple/dict whose items are all tensors/arrays.

    A list is a dataset (a list of examples), even a list of tensors.
    """
    if isinstance(data, torch.Tensor | np.ndarray):
        return True
    if isinstance(data, Mapping):
        values = list(data.values())
    elif isinstance(data, tuple):
        values = list(data)
    else:
        return False
    return bool(values) and all(isinstance(v, torch.Tensor | np.ndarray) for v in values)


def example_at(data: Any, row: int) -> Any:
    """Example ``row`` of a Dataset, DataLoader, list or in-memory batch."""
    data = getattr(data, "dataset", data)  # a DataLoader's rows are its dataset's
    if _is_batch(data) and not isinstance(data, torch.Tensor | np.ndarray):
        if isinstance(data, Mapping):
            return {k: v[row] for k, v in data.items()}
        return tuple(v[row] for v in data)
    return data[row]


def _split_item(item: Any, task: Task | None) -> tuple[Any, Any]:
    """``(input, label)`` of one example under the task's layout (label ``None`` if none)."""
    from tracin._layout import label_item, model_args

    inputs, labels = getattr(task, "inputs", None), getattr(task, "labels", None)
    owner = type(task).__name__ if task is not None else "ClassificationTask"
    if isinstance(item, torch.Tensor | np.ndarray | str) or not isinstance(
        item, tuple | list | Mapping
    ):
        return item, None
    try:
        args, kwargs = model_args(item, inputs, labels, owner)
        x: Any = args[0] if len(args) == 1 and not kwargs else (dict(kwargs) or args)
    except TaskError:
        x = item
    try:
        label = label_item(item, inputs, labels, owner)
    except (TaskError, ConfigError, KeyError, IndexError):
        label = None
    return x, label


def shown_item(item: Any, task: Task | None = None) -> Shown:
    """A dataset item (``(x, y)``, a dict, a tensor, a string) as a cell, by its layout."""
    x, label = _split_item(item, task)
    return _shown_value(x)._replace(label=plain(label))


def _shown_value(x: Any) -> Shown:
    if isinstance(x, str):
        return Shown(text=x)
    if isinstance(x, Mapping):
        text = x.get("text")
        if isinstance(text, str):
            return Shown(text=text)
        return Shown(row={str(k): _brief(v) for k, v in list(x.items())[:ROW_ITEMS]})
    arr = as_array(x)
    if arr is None or not np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_:
        return Shown(text=clip(str(x), TEXT_CHARS))
    if _image_like(arr):
        return Shown(image=png_uri(arr))
    return Shown(text=_brief(arr))


def _image_like(arr: np.ndarray) -> bool:
    if arr.ndim == 2:
        return bool(min(arr.shape) >= 4)
    if arr.ndim == 3:
        first, last = arr.shape[0] in (1, 3, 4), arr.shape[-1] in (1, 3, 4)
        side = arr.shape[1:] if first else arr.shape[:2]
        return bool((first or last) and min(side) >= 4)
    return False


def _render_view(render: Renderer, split: str, row: int) -> Mapping[str, Any]:
    """``render(split, row)``, checked: a mapping with ``"label"``.

    Raises:
        ConfigError: anything else, naming what ``render`` must return.
    """
    view = render(split, int(row))
    if not isinstance(view, Mapping) or "label" not in view:
        raise ConfigError(
            f"render({split!r}, {row}) returned {type(view).__name__}; it must return a dict "
            "with 'label' and one of 'image' (array), 'text' (str) or 'row' (dict)"
        )
    return view


def _from_render(render: Renderer, split: str, row: int) -> Shown:
    """The user's ``render(split, row)`` as a cell; checked like the report checks it.

    Raises:
        ConfigError: ``render`` returned no mapping with ``"label"``, or a bad image.
    """
    view = _render_view(render, split, row)
    image = view.get("image")
    row_view = view.get("row")
    return Shown(
        label=plain(view["label"]),
        image=None if image is None else png_uri(image),
        text=None if view.get("text") is None else str(view["text"]),
        row=None if row_view is None else {str(k): _brief(v) for k, v in row_view.items()},
    )


# --- values -----------------------------------------------------------------------------------
def as_array(x: Any) -> np.ndarray | None:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        out: np.ndarray = (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
        return out
    if isinstance(x, np.ndarray | np.generic | int | float) or hasattr(x, "__array_interface__"):
        arr: np.ndarray = np.asarray(x)
        return arr
    return None


def plain(value: Any) -> Any:
    """A label as a plain Python value: a scalar tensor or array becomes its item."""
    arr = as_array(value) if not isinstance(value, str | bool | int | float) else None
    if arr is None:
        return value
    return arr.item() if arr.size == 1 else arr.tolist()


def _brief(value: Any) -> str:
    """A short text for a value: numbers to 4 digits, arrays as their first values."""
    arr = as_array(value) if not isinstance(value, str) else None
    if arr is None:
        return clip(str(value), 40)
    if arr.ndim == 0:
        return _number(arr.item())
    flat = arr.reshape(-1)
    head = ", ".join(_number(v) for v in flat[:6].tolist())
    more = f", ... ({flat.size} values)" if flat.size > 6 else ""
    shape = "" if arr.ndim == 1 else f" shape {tuple(arr.shape)}"
    return f"[{head}{more}]{shape}"


def _number(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


# --- images -----------------------------------------------------------------------------------
def png_uri(pixels: Any, side: int = THUMB) -> str:
    """An image as a ``data:image/png;base64`` URI, at most ``side`` pixels a side.

    Grey ``(H, W)`` images are scaled min-to-max and drawn dark-on-light (the report's
    ``gray_r``); colour ``(H, W, 3|4)`` or channels-first ``(C, H, W)`` in ``[0, 1]`` or
    ``[0, 255]`` keep their values (others are scaled min-to-max). Larger images keep every
    ``ceil(max(H, W) / side)``-th pixel.

    Raises:
        ConfigError: ``pixels`` is not such an image (naming its shape and the fix).
    """
    arr = image_array(pixels)
    step = max(1, -(-max(arr.shape[:2]) // side))
    arr = arr[::step, ::step]
    low, high = float(arr.min()), float(arr.max())
    if arr.ndim == 3 and low >= 0 and high <= 255:
        low, high = 0.0, (1.0 if high <= 1 else 255.0)
    scaled = (arr - low) / ((high - low) or 1.0)
    if arr.ndim == 2:
        scaled = 1.0 - scaled
    data = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    return "data:image/png;base64," + base64.b64encode(_png(data)).decode("ascii")


def _png(pixels: np.ndarray) -> bytes:
    """8-bit grey ``(H, W)``, RGB or RGBA ``(H, W, 3|4)`` pixels as PNG bytes (RFC 2083)."""
    height, width = pixels.shape[:2]
    colour = {2: 0, 3: 2} if pixels.ndim == 2 else {3: 2, 4: 6}
    kind = 0 if pixels.ndim == 2 else colour[pixels.shape[2]]
    raw = b"".join(b"\x00" + bytes(pixels[r].tobytes()) for r in range(height))

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, kind, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


def row_count(value: Any) -> int | None:
    if value is None:
        return None
    data = getattr(value, "dataset", value)
    if _is_batch(data) and not isinstance(data, torch.Tensor | np.ndarray):
        first = next(iter(data.values() if isinstance(data, Mapping) else data))
        return len(first)
    try:
        return len(data)
    except TypeError:
        return None


def image_array(pixels: Any) -> np.ndarray:
    """``pixels`` as ``(H, W)`` grey or ``(H, W, 3|4)`` colour; channels-first is moved last.

    Raises:
        ConfigError: not numeric, or another shape (naming it and how to reshape).
    """
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(
            f"render returned an image of type {type(pixels).__name__}; it must be a numeric "
            "array of shape (H, W), (H, W, 3) or (C, H, W)"
        ) from None
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (3, 4):
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)  # channels first
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) or 0 in arr.shape:
        side = int(np.sqrt(arr.size))
        hint = (f", e.g. image.reshape({side}, {side})" if arr.ndim == 1 and side * side == arr.size
                else "")  # fmt: skip
        raise ConfigError(
            f"render returned an image of shape {arr.shape}; the report draws (H, W) grey, "
            f"(H, W, 3|4) or (C, H, W) colour images: reshape it in render{hint}, or return "
            "'text' or 'row' instead of 'image'"
        )
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return arr
