"""Training checkpoints as pickle-free ``.npz`` files, written atomically.

Layout of the archive (``np.savez``; read back with ``allow_pickle=False``):

* ``__meta__``: 1-element unicode array holding a JSON object: the format tag
  and version plus the caller's metadata (model name, epoch, seed, optimizer
  name and hyperparameters, fastnn version, metrics so far, ...).
* ``__tree__``: 1-element unicode array holding a JSON skeleton of the saved
  states (``{"model": ..., "optimizer": ..., ...}``), in which every array is
  replaced by ``{"__array__": key}`` naming its archive entry; dicts with
  non-string keys and tuples are tagged so they round-trip exactly.
* one entry per array, named after its path in the tree, e.g.
  ``model/0.weight`` or ``optimizer/state/3/exp_avg``.

Saving goes through :func:`fastnn._io.write_atomic` (re-exported here): a
temporary file in the destination directory, fsynced and renamed over the
target, so a crash or Ctrl-C while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastnn._array import is_cupy
from fastnn._io import write_atomic

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "load",
    "save",
    "write_atomic",
]

FORMAT = "fastnn-checkpoint"
FORMAT_VERSION = 1

_META = "__meta__"
_TREE = "__tree__"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or not fastnn's."""


@dataclass
class Checkpoint:
    """What :func:`load` returns.

    ``states`` maps a name (``"model"``, ``"optimizer"``, ``"scheduler"``, ...)
    to the nested state that was saved; arrays come back as NumPy arrays.
    ``metadata`` is the JSON metadata (format tag removed).
    """

    states: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def model_state(self) -> dict[str, np.ndarray]:
        return self.states.get("model", {})

    @property
    def optimizer_state(self) -> Any:
        return self.states.get("optimizer")


def _to_host(a: Any) -> np.ndarray:
    if is_cupy(a):
        return a.get()
    data = getattr(a, "data", None)  # a fastnn Tensor: save its array
    if data is not None and not isinstance(a, np.ndarray) and hasattr(a, "requires_grad"):
        return _to_host(data)
    return np.asarray(a)


def _is_array(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return True
    if is_cupy(v):
        return True
    return hasattr(v, "requires_grad") and hasattr(v, "data")  # fastnn Tensor


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """JSON skeleton of ``value``; arrays are moved into ``arrays`` under ``path``."""
    if _is_array(value):
        key = path or "array"
        if key in arrays or key in (_META, _TREE):
            key = f"{key}#{len(arrays)}"
        arr = np.asarray(_to_host(value), order="C")  # keeps 0-d arrays 0-d
        if arr.dtype.hasobject:
            # np.savez would pickle these, and load() refuses pickles.
            raise TypeError(f"cannot store an object array at {path!r} in a checkpoint")
        arrays[key] = arr
        return {"__array__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}/{k}" if path else k, arrays) for k, v in value.items()}
        items = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int, np.integer)):
                raise TypeError(f"checkpoint dict keys must be str or int, got {k!r} at {path!r}")
            k = int(k) if isinstance(k, np.integer) else k
            items.append([k, _encode(v, f"{path}/{k}" if path else str(k), arrays)])
        return {"__items__": items}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"cannot store {type(value).__name__} at {path!r} in a checkpoint "
        f"(arrays, dicts, lists, tuples, numbers, strings and None only)"
    )


def _decode(node: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if isinstance(node, dict):
        if "__array__" in node:
            return arrays[node["__array__"]]
        if "__tuple__" in node:
            return tuple(_decode(v, arrays) for v in node["__tuple__"])
        if "__items__" in node:
            return {k: _decode(v, arrays) for k, v in node["__items__"]}
        return {k: _decode(v, arrays) for k, v in node.items()}
    return node


def save(
    path: str | os.PathLike,
    states: dict[str, Any],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Atomically write ``states`` (e.g. ``{"model": model.state_dict(),
    "optimizer": opt.state_dict()}``) and JSON-able ``metadata`` to ``path``.

    Arrays may be NumPy or CuPy (copied to the host). Returns the path written.
    """
    if not isinstance(states, dict):
        raise TypeError(f"states must be a dict, got {type(states).__name__}")
    path = Path(path)
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(states, "", arrays)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **(metadata or {})}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"metadata must be JSON-serialisable: {exc}") from exc
    arrays[_META] = np.array([meta_json])
    arrays[_TREE] = np.array([json.dumps(tree)])

    write_atomic(path, lambda f: np.savez(f, **arrays))
    return path


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by :func:`save` (no pickle).

    Raises :class:`CheckpointError` with a one-line message for a missing,
    truncated, corrupt or foreign file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            # Read every member now: np.load is lazy and corruption (bad CRC,
            # short data) only shows when a member is read.
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if _META not in arrays or _TREE not in arrays:
        raise CheckpointError(f"{path}: not a fastnn checkpoint (no {_META}/{_TREE} entries)")
    try:
        meta = json.loads(str(arrays.pop(_META)[0]))
        tree = json.loads(str(arrays.pop(_TREE)[0]))
    except (ValueError, IndexError) as exc:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a fastnn checkpoint (format tag missing)")
    version = meta.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version}, this fastnn reads {FORMAT_VERSION}"
        )
    meta.pop("format")
    try:
        states = _decode(tree, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint tree refers to a missing array ({exc})") from exc
    if not isinstance(states, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint tree")
    return Checkpoint(states=states, metadata=meta)
