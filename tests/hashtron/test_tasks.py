"""Tasks: generated datasets, user CSV/JSONL, MNIST IDX files, digits, splits and shapes."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import string
import sys
from pathlib import Path

import numpy as np
import pytest
from hashtron_scalar import hash_scalar

from kiln.errors import ConfigError, DataError
from kiln.hashtron.settings import TaskSettings
from kiln.hashtron.tasks import (
    TASK_NAMES,
    build_network,
    byte_sample_features,
    char_class,
    default_layers,
    layer_specs,
    load_task,
    majority,
    mnist_idx,
    read_csv,
    read_jsonl,
    split,
)

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None


@pytest.mark.parametrize(("name", "chars"), [
    ("isdigit", string.digits), ("isupper", string.ascii_uppercase),
    ("ispunct", string.punctuation), ("isxdigit", string.hexdigits),
    ("isspace", string.whitespace), ("isalnum", string.ascii_letters + string.digits)])
def test_char_classes(name: str, chars: str) -> None:
    ds = char_class(name)
    assert ds.features[:, 0].tolist() == list(range(256)) and ds.label_bits == 1
    assert [c for c in range(256) if ds.labels[c]] == sorted(map(ord, chars))


def test_majority() -> None:
    ds = majority(bits=8, samples=300, seed=1)
    assert ds.features.shape == (300, 2) and int(ds.features.max()) <= 15
    ones = np.array([bin(int(a)).count("1") + bin(int(b)).count("1") for a, b in ds.features])
    assert (ds.labels == (ones > 4)).all()
    with pytest.raises(DataError, match="multiple of 4"):
        majority(bits=6)


def test_split_is_seeded_disjoint_and_complete() -> None:
    ds = char_class("isdigit")
    tr, ev = split(ds, 0.25, seed=3)
    assert ev is not None and len(ev) == 64 and len(tr) == 192
    assert sorted(tr.features[:, 0].tolist() + ev.features[:, 0].tolist()) == list(range(256))
    _tr2, ev2 = split(ds, 0.25, seed=3)
    assert (ev2.features == ev.features).all()
    assert (split(ds, 0.25, seed=4)[1].features != ev.features).any()
    assert split(ds, 0.0)[1] is None
    one = char_class("isdigit")
    one = type(one)("one", one.features[:1], one.labels[:1], 1)
    assert split(one, 0.5)[1] is None  # a single sample stays for training


def test_load_task_and_default_shapes() -> None:
    task = load_task(TaskSettings(name="squareroot", options={"n": 300}, eval_fraction=0.2))
    assert len(task.train) == 240 and task.eval is not None and len(task.eval) == 60
    assert task.label_bits == 5 and task.layers[-1] == {"width": 5, "premodulo": 0,
                                                         "combiner": None}
    net = build_network(list(task.layers), 0, task.label_bits)
    assert net.output_bits == 5 and net.layers[0].width == 80
    assert 0 <= task.majority_baseline() <= 1
    for n_features, bits in ((1, 1), (64, 4), (200, 3), (7, 7)):
        net = build_network(list(default_layers(n_features, bits)), 0, bits)
        assert net.output_bits == bits
        assert net.layers[0].width >= n_features  # neuron i reads feature i % F
    assert {"isalnum", "majority", "digits", "mnist_idx", "csv", "jsonl"} <= set(TASK_NAMES)


def test_task_and_layer_errors() -> None:
    with pytest.raises(ConfigError, match="unknown task 'cifar'"):
        load_task(TaskSettings(name="cifar"))
    with pytest.raises(ConfigError, match="unknown option for task 'isalnum'; it takes none"):
        load_task(TaskSettings(name="isalnum", options={"n": 3}))
    with pytest.raises(ConfigError, match=r"options\.path"):
        load_task(TaskSettings(name="csv"))
    with pytest.raises(ConfigError, match=r"options\.root"):
        load_task(TaskSettings(name="mnist_idx"))
    with pytest.raises(ConfigError, match=r"hashtron.layers\[1\].width"):
        layer_specs([{"width": 4, "combiner": {"kind": "sum", "dims": [4]}}, {"width": 0}])
    with pytest.raises(ConfigError, match=r"hashtron.layers\[0\]: unknown key"):
        layer_specs([{"width": 4, "neurons": 3}])
    with pytest.raises(ConfigError, match=r"layers\[0\].combiner.kind"):
        layer_specs([{"width": 4, "combiner": {"kind": "conv"}}, {"width": 1}])
    with pytest.raises(ConfigError, match="widen the last layer"):
        build_network([{"width": 1}], 0, label_bits=3)
    # errors found when the layers are joined name the config key too
    with pytest.raises(ConfigError, match=r"^hashtron\.layers\[0\]\.combiner: sum combiner"):
        build_network([{"width": 16, "combiner": {"kind": "sum", "dims": [8]}}, {"width": 1}], 0)
    with pytest.raises(ConfigError, match=r"^hashtron\.layers\[0\] needs a combiner"):
        build_network([{"width": 4}, {"width": 1}], 0)
    with pytest.raises(ConfigError, match=r"^hashtron\.layers\[0\]\.width: .* at most 64"):
        build_network([{"width": 65}], 0)


def test_a_first_layer_narrower_than_the_features_is_refused() -> None:
    # neuron i reads feature i % F: 8 neurons over 20 features would never read features 8..19
    layers = [{"width": 8, "combiner": {"kind": "sum", "dims": [8]}}, {"width": 1}]
    with pytest.raises(ConfigError, match=r"^hashtron\.layers\[0\]\.width is 8, .* 20 "
                       r"features .* features 8 to 19 would never be read; widen"):
        build_network(layers, 0, 1, n_features=20)
    assert build_network(layers, 0, 1, n_features=8).layers[0].width == 8


@pytest.mark.parametrize(("name", "options"), [
    ("majority", {"bits": 128}),  # 32 nibble features
    ("majority", {"bits": 16}),
    ("digits", {"features": 100}),  # 100 features for 4 label bits: 25 per output bit
])
def test_default_shapes_read_every_feature(name: str, options: dict) -> None:
    if name == "digits":
        pytest.importorskip("sklearn")
    task = load_task(TaskSettings(name=name, options=options))
    n_features = task.train.features.shape[1]
    net = build_network(list(task.layers), 0, task.label_bits, n_features)
    assert net.layers[0].width >= max(16, n_features)


def test_wide_default_shapes_count_with_a_sum_combiner() -> None:
    # a full combiner packs at most 32 bits: 40 features for one label bit need a sum
    layers = default_layers(40, 1)
    assert layers[0]["width"] == 40 and layers[0]["combiner"]["kind"] == "sum"
    net = build_network(list(layers), 0, 1, n_features=40)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, (50, 40), dtype=np.uint64).astype(np.uint32)
    assert net.forward(x).shape == (50,)
    assert default_layers(8, 1)[0]["combiner"] == {"kind": "full", "step": 16, "maxbits": 16}


@pytest.mark.parametrize(("name", "options", "message"), [
    ("majority", {"seed": -1}, "seed: got -1, expected a value >= 0"),
    ("majority", {"bits": 6}, "bits: got 6, expected a multiple of 4"),
    ("majority", {"bits": 132}, "bits: got 132, expected a value <= 128"),
    ("majority", {"samples": "many"}, "samples: got 'many', expected an integer"),
    ("squareroot", {"n": 1.5}, "n: got 1.5, expected an integer"),
    ("squareroot", {"n": True}, "n: got True, expected an integer"),
    ("squareroot", {"bits": 4}, "bits: unknown option for task 'squareroot'; it takes n"),
    ("majority", {"n": 4}, "n: unknown option for task 'majority'; it takes bits, samples, seed"),
    ("digits", {"threshold": -3}, "threshold: got -3, expected a value >= 1"),
    ("digits", {"features": 0}, "features: got 0, expected a value >= 1"),
    ("digits", {"features": None}, "features: got None, expected an integer"),
    ("mnist_idx", {"root": "x", "threshold": 256}, "threshold: got 256, expected a value <= 255"),
    ("mnist_idx", {"root": "x", "checksums": ["a"]}, "checksums: got ['a'], expected a mapping"),
    ("mnist_idx", {"root": 3}, "root: got 3, expected a non-empty string"),
    ("csv", {"path": ""}, "path: got '', expected a non-empty string"),
    ("jsonl", {"path": "x", "label": 1}, "label: got 1, expected a non-empty string"),
    ("csv", {}, "path: the csv task needs the path of your data file"),
])
def test_task_options_are_checked(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape("hashtron.task.options." + message)):
        load_task(TaskSettings(name=name, options=options))


def test_csv(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,label,b\n1,0,2\n3,1,4\n\n5,2, 6\n")
    ds = read_csv(path)
    assert ds.features.tolist() == [[1, 2], [3, 4], [5, 6]] and ds.labels.tolist() == [0, 1, 2]
    assert ds.label_bits == 2
    task = load_task(TaskSettings(name="csv", options={"path": str(path)}, eval_fraction=0.0))
    assert len(task.train) == 3 and task.eval is None


@pytest.mark.parametrize(("text", "match"), [
    ("", "empty"),
    ("a,b\n1,2\n", r"data.csv:1: no column 'label'"),
    ("a,label\n1,0\n2\n", r"data.csv:3: 1 columns, the header has 2"),
    ("a,label\n1,0\nx,1\n", r"data.csv:3 column 'a': feature 'x' is not an integer"),
    ("a,label\n1.5,0\n", r"data.csv:2 column 'a': feature '1.5' is not an integer"),
    ("a,label\n-1,0\n", r"data.csv:2 column 'a': feature -1 is outside"),
    ("a,label\n1,-2\n", r"data.csv:2 column 'label': label -2 is outside"),
    ("a,label\n4294967296,0\n", r"feature 4294967296 is outside"),
    ("a,label\n", "no samples"),
    ("label\n1\n", "no feature column"),
])
def test_csv_errors_say_where(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_csv(path)


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"features": [1, 2, 3], "label": 1}, {"features": [4, 5, 6], "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = read_jsonl(path)
    assert ds.features.tolist() == [[1, 2, 3], [4, 5, 6]] and ds.labels.tolist() == [1, 0]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"x": [7], "y": 3}) + "\n")
    assert read_jsonl(other, label="y", features="x").labels.tolist() == [3]


@pytest.mark.parametrize(("lines", "match"), [
    (['{"features": [1], "label": 0}', "{oops"], r"data.jsonl:2: not valid JSON"),
    (['{"features": [1]}'], r"data.jsonl:1: expected an object with keys"),
    (['[1, 2]'], r"data.jsonl:1: expected an object"),
    (['{"features": [], "label": 0}'], "non-empty list"),
    (['{"features": [1, 2], "label": 0}', '{"features": [1], "label": 0}'],
     r"data.jsonl:2: 1 features, earlier lines have 2"),
    (['{"features": [1, "a"], "label": 0}'], r"data.jsonl:1 features\[1\]: feature 'a'"),
    (['{"features": [1], "label": 0.5}'], r"label 0.5 is not an integer"),
    (['{"features": [true], "label": 0}'], r"feature True is not an integer"),
    (['{"features": ["1", 2], "label": 0}'], r"data.jsonl:1 features\[0\]: feature '1' is not"),
    (['{"features": [1], "label": 1.0}'], r"data.jsonl:1 key 'label': label 1.0 is not"),
    (['{"features": [2.0], "label": 1}'], r"data.jsonl:1 features\[0\]: feature 2.0 is not"),
])
def test_jsonl_errors_say_where(tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        read_jsonl(path)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    # Excel writes UTF-8 with a BOM; it must not end up in the first column name or key
    csv_path, jsonl_path = tmp_path / "bom.csv", tmp_path / "bom.jsonl"
    csv_path.write_text("label,a\n1,2\n0,3\n", encoding="utf-8-sig")
    jsonl_path.write_text('{"features": [2], "label": 1}\n', encoding="utf-8-sig")
    ds = read_csv(csv_path)
    assert ds.features.tolist() == [[2], [3]] and ds.labels.tolist() == [1, 0]
    assert read_jsonl(jsonl_path).features.tolist() == [[2]]


def test_missing_user_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read CSV"):
        read_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="cannot read JSONL"):
        read_jsonl(tmp_path / "nope.jsonl")
    # through a config, the error names the key that holds the path
    for name, target in (("csv", tmp_path / "nope.csv"), ("jsonl", tmp_path)):
        with pytest.raises(DataError, match=rf"^hashtron\.task\.options\.path: .* is not a "
                           rf"file; give the path of your {name} data file"):
            load_task(TaskSettings(name=name, options={"path": str(target)}))


def test_byte_sample_features_match_the_reference_formula() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (5, 49))
    feats = byte_sample_features(pixels, 12)
    for i in range(5):
        for n in range(12):
            want = 0
            for j in range(4):
                want ^= int(pixels[i, hash_scalar(n, j, 49)]) << (8 * j)
            assert int(feats[i, n]) == want


def _idx(dims: list[int], data: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + data.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int = 6, n_test: int = 4, gz: bool = False) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {f"{prefix}-images-idx3-ubyte": _idx([n, 28, 28], rng.integers(0, 256, n * 784)),
                 f"{prefix}-labels-idx1-ubyte": _idx([n], rng.integers(0, 10, n))}
        for name, blob in files.items():
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(blob, mtime=0))
            else:
                (root / name).write_bytes(blob)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx(tmp_path: Path, gz: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mnist(tmp_path, gz=gz)
    if gz:  # our synthetic files are not the standard ones: their known sums must not apply
        monkeypatch.setattr("kiln.hashtron.tasks.MNIST_SHA256", {})
    train, test = mnist_idx(tmp_path, features=10, train_limit=5)
    assert train.features.shape == (5, 10) and test.features.shape == (4, 10)
    assert train.label_bits == 4 and int(train.labels.max()) <= 9
    task = load_task(TaskSettings(name="mnist_idx", options={"root": str(tmp_path),
                                                             "features": 16}))
    assert task.eval is not None and len(task.eval) == 4 and task.layers[-1]["width"] == 4
    # Its eval set is MNIST's test set: a split setting would silently do nothing.
    for key, value in (("eval_fraction", 0.5), ("split_seed", 3)):
        settings = TaskSettings(name="mnist_idx", options={"root": str(tmp_path)}, **{key: value})
        with pytest.raises(ConfigError, match=rf"hashtron\.task\.{key}: mnist_idx evaluates on"):
            load_task(settings)


def test_mnist_checksums_and_corruption(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=True)  # standard names: checked against the known sums
    with pytest.raises(DataError, match="does not match the expected"):
        mnist_idx(tmp_path)
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_mnist(raw)
    name = "train-labels-idx1-ubyte"
    good = hashlib.sha256((raw / name).read_bytes()).hexdigest()
    mnist_idx(raw, checksums={name: good})
    with pytest.raises(DataError, match="sha256"):
        mnist_idx(raw, checksums={name: "0" * 64})
    with pytest.raises(ConfigError, match=rf"options\.checksums\.{name}: got 123, expected"):
        mnist_idx(raw, checksums={name: 123})
    (raw / name).write_bytes((raw / name).read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated or corrupt"):
        mnist_idx(raw)
    (raw / name).write_bytes(b"\x00\x00\x09\x01")
    with pytest.raises(DataError, match="magic"):
        mnist_idx(raw)
    (raw / name).unlink()
    with pytest.raises(DataError, match="never downloads"):
        mnist_idx(raw)
    with pytest.raises(DataError, match="not a folder"):
        mnist_idx(tmp_path / "nowhere")


def test_digits_without_scikit_learn_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(DataError, match=r"kiln-train\[digits\]"):
        load_task(TaskSettings(name="digits"))


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn (extra kiln-train[digits]) absent")
def test_digits() -> None:
    task = load_task(TaskSettings(name="digits", options={"features": 24}))
    assert len(task.train) + len(task.eval) == 1797 and task.label_bits == 4
    assert task.train.features.shape[1] == 24
    binary = task.train.features
    assert set(np.unique(binary & 0xFF).tolist()) <= {0, 1}  # binarised pixels
    raw = load_task(TaskSettings(name="digits", options={"threshold": None}))
    assert int((raw.train.features & 0xFF).max()) == 16
