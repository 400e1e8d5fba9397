"""Tasks: a dataset, its train/eval split and a default network shape, by name.

``load_task(TaskSettings(name, eval_fraction, split_seed, options))`` returns a ``Task``. Names:

- ``isalnum``, ``isdigit``, ``isupper``, ``ispunct``, ``isxdigit``, ``isspace``: the 256 byte
  values labelled by an ASCII character class (generated);
- ``squareroot``: ``0..n-1`` labelled ``floor(sqrt(i))``; option ``n`` (default 1024);
- ``majority``: random bit vectors, label 1 where more than half the bits are set, given as
  4-bit nibble features; options ``bits`` (16), ``samples`` (4096), ``seed`` (0);
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline); needs the
  optional extra ``kiln-train[digits]``; options ``features`` (32), ``threshold`` (8: pixels
  are binarised; null: raw 0..16);
- ``mnist_idx``: MNIST from local IDX files (never downloaded); options ``root`` (folder),
  ``features`` (80), ``train_limit`` / ``eval_limit``, ``checksums`` ({file: sha256}),
  ``threshold`` (null: raw bytes as in the reference);
  the official test set is the eval set;
- ``csv`` / ``jsonl``: your own integer features and labels; options ``path``, ``label``
  (column or key, default ``label``) and, for jsonl, ``features`` (key, default ``features``).

``TASK_OPTIONS`` gives each task's options, their types and ranges; ``check_options`` checks
them (before any data is read), naming ``hashtron.task.options.<key>``.

Image features follow the reference's byte sample: feature ``n`` packs 4 pixels, pixel
``hash(n, j, pixels)`` in byte ``j``. Labels are non-negative integers; the network's output
code must equal the label, so a task needs ``label_bits`` output neurons.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from kiln.errors import ConfigError, DataError
from kiln.hashtron.combiners import (
    MAX_FEATURE_BITS,
    Full,
    Sum,
    combiner_from_dict,
    combiner_to_dict,
)
from kiln.hashtron.datasets import HashtronDataset, isalnum, squareroot
from kiln.hashtron.hash import hash32
from kiln.hashtron.network import LayerSpec, Network
from kiln.hashtron.settings import TaskSettings, check_int

MAX_FEATURE = 2**32 - 1
# sha256 of the standard MNIST files (gzip), as the reference checks them
MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}


@dataclass(frozen=True, eq=False)
class Task:
    """A named dataset split into ``train`` and ``eval`` (None: no eval set) and the default
    network ``layers`` (JSON-able dicts, see ``layer_specs``)."""

    name: str
    train: HashtronDataset
    eval: HashtronDataset | None
    layers: tuple[dict[str, Any], ...]

    @property
    def label_bits(self) -> int:
        """Output neurons needed for the labels."""
        return self.train.label_bits

    def majority_baseline(self, split: str = "eval") -> float | None:
        """Accuracy of always answering the training set's most common label."""
        ds = self.eval if split == "eval" else self.train
        if ds is None:
            return None
        values, counts = np.unique(self.train.labels, return_counts=True)
        return float(np.mean(ds.labels == values[np.argmax(counts)]))


# -- generated tasks ---------------------------------------------------------------------

_CHAR_CLASSES: dict[str, str] = {
    "isdigit": string.digits, "isupper": string.ascii_uppercase,
    "ispunct": string.punctuation, "isxdigit": string.hexdigits, "isspace": string.whitespace,
}


def char_class(name: str) -> HashtronDataset:
    """The 256 byte values labelled 1 where the byte is in ASCII class ``name``."""
    if name == "isalnum":
        return isalnum()
    members = {ord(c) for c in _CHAR_CLASSES[name]}
    codes = np.arange(256, dtype=np.uint32)
    labels = np.array([c in members for c in range(256)], dtype=np.uint64)
    return HashtronDataset(name, codes[:, None], labels, 1)


def majority(bits: int = 16, samples: int = 4096, seed: int = 0) -> HashtronDataset:
    """Random ``bits``-bit vectors as ``bits/4`` nibble features; label: more than half set."""
    if bits < 4 or bits % 4 or bits > 128:
        raise DataError(f"majority: bits must be a multiple of 4 in [4, 128], got {bits}")
    if samples < 1:
        raise DataError(f"majority: samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    vec = rng.integers(0, 2, (samples, bits), dtype=np.uint8)
    nibbles = vec.reshape(samples, bits // 4, 4) @ np.array([8, 4, 2, 1], dtype=np.uint32)
    labels = (vec.sum(axis=1) * 2 > bits).astype(np.uint64)
    return HashtronDataset(f"majority{bits}", nibbles.astype(np.uint32), labels, 1)


def byte_sample_features(pixels: NDArray, n_features: int) -> NDArray[np.uint32]:
    """The reference's image features: feature ``n`` packs pixel ``hash(n, j, P)`` (8 bits
    each, clipped to 255) into byte ``j``, for ``j < 4``. ``pixels``: ``[N, P]``."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.shape[1] == 0:
        raise DataError(f"image features need pixels of shape [images, pixels], got "
                        f"{pixels.shape}")
    if n_features < 1:
        raise ConfigError(f"hashtron.task.options.features must be >= 1, got {n_features}")
    px = np.clip(pixels, 0, 255).astype(np.uint32)
    out = np.zeros((px.shape[0], n_features), dtype=np.uint32)
    n = np.arange(n_features, dtype=np.uint32)
    for j in range(4):
        idx = hash32(n, j, px.shape[1]).astype(np.intp)
        out ^= px[:, idx] << np.uint32(8 * j)
    return out


def digits(features: int = 32, threshold: int | None = 8) -> HashtronDataset:
    """scikit-learn's 8x8 digits (bundled with it, no download) as byte-sample features;
    pixels (0..16) are binarised at ``threshold`` (None: raw values), so that similar images
    share feature values."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits task needs scikit-learn, which is not installed; install "
                        "the optional extra: pip install 'kiln-train[digits]' (or pip install "
                        "scikit-learn)") from None
    data = load_digits()
    pixels = data.data.astype(np.int64)
    if threshold is not None:
        pixels = (pixels >= threshold).astype(np.int64)
    return HashtronDataset("digits", byte_sample_features(pixels, features),
                           data.target.astype(np.uint64), 4)


# -- MNIST from local IDX files ----------------------------------------------------------

def read_idx(path: Path, expected_dims: int, checksum: str | None = None) -> NDArray[np.uint8]:
    """Read a uint8 IDX file (optionally gzip), checking its sha256 when one is known."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}; check the path and permissions") from None
    if checksum is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != checksum.lower():
            raise DataError(f"{path}: sha256 {digest} does not match the expected {checksum}; "
                            "the file is corrupt or not the standard one: fetch it again")
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: not a readable gzip file ({exc}); fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
        raise DataError(f"{path}: not a uint8 IDX file with {expected_dims} dimension(s) (bad "
                        "magic number); check that the file is the right one")
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header; fetch the file again")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    size = math.prod(dims)
    if len(raw) - header != size:
        raise DataError(f"{path}: header says {dims} = {size} bytes of data, the file has "
                        f"{len(raw) - header}; the file is truncated or corrupt: fetch it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DataError(f"mnist_idx: neither {stem}.gz nor {stem} is in {root}; put the four MNIST "
                    "IDX files there (Kiln never downloads them) or set "
                    "hashtron.task.options.root")


def mnist_idx(root: str | Path, features: int = 80, train_limit: int | None = None,
              eval_limit: int | None = None, checksums: dict[str, str] | None = None,
              threshold: int | None = None) -> tuple[HashtronDataset, HashtronDataset]:
    """MNIST train and test sets from local IDX files (gzip or raw) in ``root``; pixels are
    raw bytes as in the reference, or binarised at ``threshold``.

    gzip files with the standard names are checked against ``MNIST_SHA256``; other files
    against ``checksums`` where given (file name -> sha256).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"mnist_idx: {root} is not a folder; set hashtron.task.options.root to "
                        "the folder holding the MNIST IDX files")
    for file, digest in (checksums or {}).items():
        if not isinstance(digest, str):
            raise ConfigError(f"hashtron.task.options.checksums.{file}: got {digest!r}, "
                              "expected the file's sha256 as a hex string")
    known = {**MNIST_SHA256, **(checksums or {})}
    out = []
    for prefix, limit in (("train", train_limit), ("t10k", eval_limit)):
        img_path = _find(root, f"{prefix}-images-idx3-ubyte")
        lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
        images = read_idx(img_path, 3, known.get(img_path.name))
        labels = read_idx(lbl_path, 1, known.get(lbl_path.name))
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"mnist_idx: {img_path.name} has {images.shape[0]} images but "
                            f"{lbl_path.name} {labels.shape[0]} labels; use matching files")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        pixels = images.reshape(images.shape[0], -1)
        if threshold is not None:
            pixels = (pixels >= threshold).astype(np.uint8)
        feats = byte_sample_features(pixels, features)
        out.append(HashtronDataset(f"mnist-{prefix}", feats, labels.astype(np.uint64), 4))
    return out[0], out[1]


# -- user datasets -----------------------------------------------------------------------

def _int_value(value: Any, where: str, limit: int, what: str) -> int:
    """``value`` (a JSON value, or a CSV cell parsed by ``_cell``) as an int in ``[0, limit]``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{where}: {what} {value!r} is not an integer; features and labels must "
                        "be non-negative integers (quantise real values first)")
    if not 0 <= value <= limit:
        raise DataError(f"{where}: {what} {value} is outside [0, {limit}]")
    return value


def _cell(text: str) -> int | str:
    """A CSV cell as an int where it holds one, else the text (which ``_int_value`` refuses)."""
    try:
        return int(text.strip())
    except ValueError:
        return text


def _dataset(name: str, rows: list[list[int]], labels: list[int], where: str) -> HashtronDataset:
    if not rows:
        raise DataError(f"{where}: no samples; the file needs at least one data row")
    y = np.array(labels, dtype=np.uint64)
    bits = max(1, int(y.max()).bit_length())
    if bits > 64:
        raise DataError(f"{where}: labels need {bits} bits; at most 64 are supported")
    return HashtronDataset(name, np.array(rows, dtype=np.uint32), y, bits)


def read_csv(path: str | Path, label: str = "label") -> HashtronDataset:
    """A CSV file with a header row: column ``label`` is the label, every other column an
    integer feature."""
    path = Path(path).expanduser()
    try:
        # utf-8-sig: a byte order mark (as Excel writes) is not part of the first column name
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: the file is empty; it needs a header row and data")
            header = [h.strip() for h in header]
            if label not in header:
                raise DataError(f"{path}:1: no column {label!r} in the header {header}; name the "
                                "label column 'label' or set hashtron.task.options.label")
            li = header.index(label)
            if len(header) < 2:
                raise DataError(f"{path}:1: the header has no feature column besides {label!r}")
            rows, labels = [], []
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                where = f"{path}:{lineno}"
                if len(row) != len(header):
                    raise DataError(f"{where}: {len(row)} columns, the header has "
                                    f"{len(header)}; every row needs one value per column")
                labels.append(_int_value(_cell(row[li]), f"{where} column {label!r}",
                                         2**64 - 1, "label"))
                rows.append([_int_value(_cell(v), f"{where} column {header[i]!r}", MAX_FEATURE,
                                        "feature") for i, v in enumerate(row) if i != li])
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read CSV {path}: {exc}; check the path and that it is UTF-8 "
                        "text") from None
    return _dataset(path.stem, rows, labels, str(path))


def read_jsonl(path: str | Path, label: str = "label",
               features: str = "features") -> HashtronDataset:
    """A JSON Lines file: one object per line, ``{"features": [ints], "label": int}``."""
    path = Path(path).expanduser()
    rows: list[list[int]] = []
    labels: list[int] = []
    try:
        with path.open(encoding="utf-8-sig") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{where}: not valid JSON ({exc.msg}); each line must be "
                                    "one JSON object") from None
                if not isinstance(obj, dict) or label not in obj or features not in obj:
                    raise DataError(f"{where}: expected an object with keys {features!r} (a "
                                    f"list of integers) and {label!r} (an integer)")
                feats = obj[features]
                if not isinstance(feats, list) or not feats:
                    raise DataError(f"{where}: {features!r} must be a non-empty list of "
                                    "integers")
                if rows and len(feats) != len(rows[0]):
                    raise DataError(f"{where}: {len(feats)} features, earlier lines have "
                                    f"{len(rows[0])}; every sample needs the same number")
                labels.append(_int_value(obj[label], f"{where} key {label!r}", 2**64 - 1,
                                         "label"))
                rows.append([_int_value(v, f"{where} {features}[{i}]", MAX_FEATURE, "feature")
                             for i, v in enumerate(feats)])
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read JSONL {path}: {exc}; check the path and that it is UTF-8 "
                        "text") from None
    return _dataset(path.stem, rows, labels, str(path))


# -- splits, shapes and the registry -----------------------------------------------------

def split(ds: HashtronDataset, eval_fraction: float,
          seed: int = 0) -> tuple[HashtronDataset, HashtronDataset | None]:
    """A seeded random split; ``eval_fraction`` 0 (or a single sample) gives no eval set."""
    n = len(ds)
    n_eval = min(round(n * eval_fraction), n - 1)
    if n_eval <= 0:
        return ds, None
    order = np.random.default_rng(seed).permutation(n)
    tr, ev = np.sort(order[n_eval:]), np.sort(order[:n_eval])
    return (HashtronDataset(ds.name, ds.features[tr], ds.labels[tr], ds.label_bits),
            HashtronDataset(ds.name, ds.features[ev], ds.labels[ev], ds.label_bits))


def default_layers(n_features: int, label_bits: int) -> tuple[dict[str, Any], ...]:
    """Two layers: ``group`` first-layer neurons per output bit (16, or more so that every
    input feature is read), joined into the feature of that output neuron by a ``full``
    combiner (the group's bits packed) or, for groups wider than a uint32 feature holds, a
    ``sum`` combiner (the group's ones counted)."""
    group = max(16, math.ceil(n_features / label_bits))
    # neuron i reads feature i % F: a narrower first layer would never read some features
    combiner = (Full(step=group, maxbits=group) if group <= MAX_FEATURE_BITS
                else Sum((group, label_bits)))
    first = LayerSpec(group * label_bits, 0, combiner)
    return tuple(_spec_to_dict(s) for s in (first, LayerSpec(label_bits)))


def majority_layers(n_features: int) -> tuple[dict[str, Any], ...]:
    """The majority task's shape: 16 first-layer neurons (or one per feature, if more), their
    ones counted by a ``sum`` combiner into the one output neuron."""
    width = max(16, n_features)
    return tuple(_spec_to_dict(s) for s in (LayerSpec(width, 0, Sum((width,))), LayerSpec(1)))


def _spec_to_dict(spec: LayerSpec) -> dict[str, Any]:
    return {"width": spec.width, "premodulo": spec.premodulo,
            "combiner": None if spec.combiner is None else combiner_to_dict(spec.combiner)}


def layer_specs(layers: Any, where: str = "hashtron.layers") -> list[LayerSpec]:
    """``LayerSpec``s from JSON-able dicts ``{width, premodulo, combiner}``."""
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ConfigError(f"{where}: expected a non-empty list of layers, got {layers!r}")
    specs = []
    for i, layer in enumerate(layers):
        at = f"{where}[{i}]"
        if not isinstance(layer, dict) or "width" not in layer:
            raise ConfigError(f"{at}: expected a mapping with 'width' (and optional "
                              f"'premodulo', 'combiner'), got {layer!r}")
        unknown = sorted(set(layer) - {"width", "premodulo", "combiner"})
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {unknown}; use width, premodulo, combiner")
        width, premodulo = layer["width"], layer.get("premodulo", 0)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"{at}.width: got {width!r}, expected an integer >= 1")
        if isinstance(premodulo, bool) or not isinstance(premodulo, int) \
                or not 0 <= premodulo <= MAX_FEATURE:
            raise ConfigError(f"{at}.premodulo: got {premodulo!r}, expected an integer in "
                              "[0, 2**32)")
        comb = layer.get("combiner")
        specs.append(LayerSpec(width, premodulo, None if comb is None
                               else combiner_from_dict(comb, f"{at}.combiner")))
    return specs


def build_network(layers: Any, seed: int | list[int], label_bits: int | None = None,
                  n_features: int | None = None) -> Network:
    """A network of fresh random neurons shaped by ``layers`` (dicts); checks that the last
    layer has enough output neurons for ``label_bits`` and that the first layer reads every
    one of ``n_features`` input features (which the network then insists on)."""
    specs = layer_specs(layers)
    if label_bits is not None and specs[-1].width < label_bits:
        raise ConfigError(f"hashtron.layers[{len(specs) - 1}].width is {specs[-1].width}, but "
                          f"the labels need {label_bits} output neurons; widen the last layer")
    if n_features is not None and specs[0].width < n_features:
        # neuron i reads feature i % F, so features width..F-1 would silently be ignored
        raise ConfigError(f"hashtron.layers[0].width is {specs[0].width}, but the data has "
                          f"{n_features} features per sample and neuron i of the first layer "
                          f"reads feature i % {n_features}, so features {specs[0].width} to "
                          f"{n_features - 1} would never be read; widen the first layer to at "
                          f"least {n_features} neurons")
    return Network.random(specs, np.random.default_rng(seed), "hashtron.layers", n_features)


@dataclass(frozen=True)
class Option:
    """The values a task option takes: ``kind`` (int, str or dict); ints in ``[low, high]``
    and a multiple of ``multiple``; None too where ``null``. ``needs`` (what to give) makes the
    option required; an option left out otherwise gets the loader's default."""

    kind: type = int
    low: int | None = None
    high: int | None = None
    multiple: int = 1
    null: bool = False
    needs: str = ""

    def check(self, where: str, value: Any) -> None:
        """Raise ``ConfigError`` naming ``where`` unless the option takes ``value``."""
        if value is None and self.null:
            return
        if self.kind is int:
            check_int(where, value, self.low, self.high)
            if value % self.multiple:
                raise ConfigError(f"{where}: got {value!r}, expected a multiple of "
                                  f"{self.multiple}")
        elif not isinstance(value, self.kind) or value == "":
            expected = "a non-empty string" if self.kind is str else "a mapping"
            raise ConfigError(f"{where}: got {value!r}, expected {expected}")


_NAME = Option(str)  # a column or key name
TASK_OPTIONS: dict[str, dict[str, Option]] = {
    **{name: {} for name in ("isalnum", *_CHAR_CLASSES)},
    "squareroot": {"n": Option(low=1, high=2**32)},
    "majority": {"bits": Option(low=4, high=128, multiple=4), "samples": Option(low=1),
                 "seed": Option(low=0)},
    "digits": {"features": Option(low=1), "threshold": Option(low=1, high=16, null=True)},
    "mnist_idx": {"root": Option(str, needs="the folder holding the MNIST IDX files"),
                  "features": Option(low=1), "train_limit": Option(low=1, null=True),
                  "eval_limit": Option(low=1, null=True), "checksums": Option(dict, null=True),
                  "threshold": Option(low=1, high=255, null=True)},
    "csv": {"path": Option(str, needs="the path of your data file"), "label": _NAME},
    "jsonl": {"path": Option(str, needs="the path of your data file"), "label": _NAME,
              "features": _NAME},
}
TASK_NAMES = tuple(TASK_OPTIONS)
FILE_TASKS = ("mnist_idx", "csv", "jsonl")  # tasks that read data files you provide
# Loaders of the tasks split by ``split`` (mnist_idx comes split into train and test).
_DATASETS: dict[str, Callable[..., HashtronDataset]] = {
    **{name: partial(char_class, name) for name in ("isalnum", *_CHAR_CLASSES)},
    "squareroot": squareroot, "majority": majority, "digits": digits,
    "csv": read_csv, "jsonl": read_jsonl,
}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming ``hashtron.task.options.<key>`` unless ``options`` are
    valid options of task ``name`` (see ``TASK_OPTIONS``), the required ones given."""
    specs = TASK_OPTIONS[name]
    for key, value in options.items():
        where = f"hashtron.task.options.{key}"
        if key not in specs:
            raise ConfigError(f"{where}: unknown option for task {name!r}; it takes "
                              f"{', '.join(specs) or 'none'}")
        specs[key].check(where, value)
    for key, spec in specs.items():
        if spec.needs and key not in options:
            raise ConfigError(f"hashtron.task.options.{key}: the {name} task needs {spec.needs}")


def load_task(settings: TaskSettings | None = None) -> Task:
    """Load, split and shape the task ``settings.name`` (see the module doc)."""
    settings = settings or TaskSettings()
    name, options = settings.name, dict(settings.options)
    if name not in TASK_OPTIONS:
        raise ConfigError(f"hashtron.task.name: unknown task {name!r}; use one of "
                          f"{list(TASK_NAMES)}")
    check_options(name, options)
    if name in ("csv", "jsonl") and not Path(options["path"]).expanduser().is_file():
        raise DataError(f"hashtron.task.options.path: {options['path']} is not a file; give the "
                        f"path of your {name} data file (a relative path is taken from the "
                        "folder kiln runs in)")
    if name == "mnist_idx":
        default = TaskSettings()
        for key in ("eval_fraction", "split_seed"):
            if getattr(settings, key) != getattr(default, key):
                raise ConfigError(
                    f"hashtron.task.{key}: mnist_idx evaluates on MNIST's own test set and "
                    f"splits nothing, so {getattr(settings, key)!r} would change nothing; remove "
                    "it (eval_limit and train_limit in hashtron.task.options cap the two sets)")
        train, eval_ = mnist_idx(**options)
    else:
        full = _DATASETS[name](**options)
        train, eval_ = split(full, settings.eval_fraction, settings.split_seed)
    bits = max(train.label_bits, 0 if eval_ is None else eval_.label_bits)
    if bits != train.label_bits:
        train = HashtronDataset(train.name, train.features, train.labels, bits)
    n_features = train.features.shape[1]
    layers = majority_layers(n_features) if name == "majority" else \
        default_layers(n_features, bits)
    return Task(name, train, eval_, layers)
