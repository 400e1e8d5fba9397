"""Pickle-free serialisation of arbitrary training state.

``encode_state`` splits a nested structure into a flat ``{key: tensor}`` dict (for safetensors)
and a JSON-serialisable skeleton that references the tensors by key. ``decode_state`` reverses
it exactly: tuples stay tuples, int dict keys stay ints, numpy arrays come back as numpy arrays
with the same dtype and floats keep inf/nan. Dict subclasses (the OrderedDict of
``Module.state_dict()``) come back as plain dicts with the same items in the same order.

Skeleton encoding: JSON scalars, lists and str-keyed dicts map to themselves; everything else
is a JSON object holding exactly one reserved tag key (plus its fields):

- ``{"__tensor__": key}``: a torch tensor;
- ``{"__ndarray__": key, "dtype": "<u4", "shape": [...]}``: a numpy array (``"scalar": true``
  for a numpy scalar such as ``np.float64``);
- ``{"__tuple__": [...]}``, ``{"__bytes__": base64}``, ``{"__float__": "inf"|"-inf"|"nan"}``;
- ``{"__dict__": [[key, value], ...]}``: a dict with a non-str key or a key that is a tag.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"
_TUPLE = "__tuple__"
_BYTES = "__bytes__"
_FLOAT = "__float__"
_DICT = "__dict__"
_TAGS = frozenset({_TENSOR, _NDARRAY, _TUPLE, _BYTES, _FLOAT, _DICT})

# numpy dtypes (without byte-order char) that every supported torch/safetensors stores natively.
_NATIVE_NUMPY = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "f2", "f4", "f8"})
# Wide unsigned ints are bit-cast to signed ones: torch support for them arrived late.
_SIGNED_VIEW = {"u2": "i2", "u4": "i4", "u8": "i8"}
# Other plain-data kinds (complex, datetime, byte strings...) are stored as raw bytes.
_RAW_KINDS = frozenset("biufcmMSU")

_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into ``(tensors, skeleton)``.

    ``tensors`` maps keys ``"t0"``, ``"t1"``... to contiguous CPU copies that share no storage,
    ready for ``safetensors.torch.save_file``; ``skeleton`` is JSON-serialisable (no inf/nan)
    and references the tensors by key. Tensors that view exactly the same memory are stored once
    and decode to one shared tensor. Raises ``TypeError`` naming the path of an unsupported value.
    """
    encoder = _Encoder()
    skeleton = encoder.encode(obj, "state")
    return encoder.tensors, skeleton


def decode_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Rebuild the structure that ``encode_state`` split into ``(tensors, skeleton)``.

    Raises ``ValueError`` if the skeleton is malformed or references a missing tensor.
    """
    return _decode(tensors, skeleton, "state")


class _Encoder:
    """Walks a structure once, collecting tensors under sequential keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen: dict[tuple, str] = {}

    def encode(self, obj: Any, where: str) -> Any:
        # Order matters: bool is an int, np.float64 is a float.
        if isinstance(obj, torch.Tensor):
            return {_TENSOR: self._add_tensor(obj)}
        if isinstance(obj, (np.ndarray, np.generic)):
            return self._encode_array(obj, where)
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return float(obj) if math.isfinite(obj) else {_FLOAT: _float_name(obj)}
        if isinstance(obj, bytes):
            return {_BYTES: base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, list):
            return [self.encode(item, f"{where}[{i}]") for i, item in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_TUPLE: [self.encode(item, f"{where}[{i}]") for i, item in enumerate(obj)]}
        if isinstance(obj, dict):
            return self._encode_dict(obj, where)
        raise TypeError(
            f"cannot encode {type(obj).__qualname__} at {where}: supported types are dict, list, "
            "tuple, int, float, bool, None, str, bytes, torch.Tensor and numpy arrays"
        )

    def _encode_dict(self, obj: dict, where: str) -> Any:
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: self.encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            _DICT: [
                [self.encode(k, f"{where} key {k!r}"), self.encode(v, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }

    def _add_tensor(self, tensor: torch.Tensor) -> str:
        alias = None
        if tensor.numel() > 0 and tensor.layout == torch.strided:
            alias = (
                tensor.device,
                tensor.is_conj(),
                tensor.is_neg(),
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tensor.dtype,
                tuple(tensor.shape),
                tuple(tensor.stride()),
            )
            if alias in self._seen:
                return self._seen[alias]
        key = f"t{len(self.tensors)}"
        # One fresh contiguous CPU copy: safetensors rejects shared or strided storage and
        # writes raw memory, so lazy conjugate/negative views are materialised first.
        self.tensors[key] = (
            tensor.detach()
            .resolve_conj()
            .resolve_neg()
            .to(device="cpu", memory_format=torch.contiguous_format, copy=True)
        )
        if alias is not None:
            self._seen[alias] = key
        return key

    def _encode_array(self, obj: np.ndarray | np.generic, where: str) -> dict:
        array = np.array(obj, order="C", copy=True)  # private contiguous copy; 0-d for scalars
        dtype = array.dtype
        if dtype.kind not in _RAW_KINDS:
            raise TypeError(f"cannot encode numpy dtype {dtype} at {where}: only plain data")
        code = dtype.str[1:]
        if dtype.isnative and code in _NATIVE_NUMPY:
            stored = array
        elif dtype.isnative and code in _SIGNED_VIEW:
            stored = array.view(_SIGNED_VIEW[code])
        else:
            stored = array.reshape(-1).view(np.uint8)
        key = f"t{len(self.tensors)}"
        self.tensors[key] = torch.from_numpy(stored)
        encoded: dict[str, Any] = {_NDARRAY: key, "dtype": dtype.str, "shape": list(array.shape)}
        if isinstance(obj, np.generic):
            encoded["scalar"] = True
        return encoded


def _float_name(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def _decode(tensors: dict[str, torch.Tensor], node: Any, where: str) -> Any:
    if isinstance(node, list):
        return [_decode(tensors, item, f"{where}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    tags = [key for key in node if key in _TAGS]
    if not tags:
        return {k: _decode(tensors, v, f"{where}[{k!r}]") for k, v in node.items()}
    if len(tags) > 1:
        raise ValueError(f"malformed state skeleton at {where}: several tags {tags}")
    tag = tags[0]
    value = node[tag]
    if tag == _TUPLE and isinstance(value, list):
        return tuple(_decode(tensors, item, f"{where}[{i}]") for i, item in enumerate(value))
    if tag == _DICT and isinstance(value, list) and all(_is_pair(p) for p in value):
        return {
            _decode(tensors, k, f"{where} key"): _decode(tensors, v, f"{where}[{k!r}]")
            for k, v in value
        }
    try:
        return _decode_leaf(tensors, tag, node)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed state skeleton at {where} ({tag}): {exc!r}") from exc


def _is_pair(item: Any) -> bool:
    return isinstance(item, list) and len(item) == 2


def _decode_leaf(tensors: dict[str, torch.Tensor], tag: str, node: dict) -> Any:
    value = node[tag]
    if tag == _TENSOR:
        return tensors[value]
    if tag == _NDARRAY:
        array = tensors[value].numpy().view(np.dtype(node["dtype"])).reshape(node["shape"])
        return array[()] if node.get("scalar") else array
    if tag == _BYTES:
        return base64.b64decode(value, validate=True)
    if tag == _FLOAT:
        return _SPECIAL_FLOATS[value]
    raise ValueError(f"{tag} needs a list, got {type(value).__name__}")
