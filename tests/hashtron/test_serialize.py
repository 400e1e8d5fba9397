"""Saving and loading networks: exact round trips, checkpoint-codec compatibility, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hashtron_nets import small_network

from kiln.errors import CheckpointError
from kiln.hashtron import load_network, network_from_state, network_state, save_network
from kiln.hashtron.network import Network
from kiln.state_codec import decode_state, encode_state


def _same(a: Network, b: Network) -> None:
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert la.neurons == lb.neurons
        assert la.premodulo == lb.premodulo and la.combiner == lb.combiner


@pytest.mark.parametrize("seed", [0, 1])
def test_file_round_trip(tmp_path: Path, seed: int) -> None:
    net = small_network(seed)
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    back = load_network(path)
    _same(net, back)
    x = np.random.default_rng(seed).integers(0, 2**32, (64, 3), dtype=np.uint64)
    assert (back.forward(x) == net.forward(x)).all()
    save_network(back, tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_the_input_width_is_saved_with_the_network(tmp_path: Path) -> None:
    net = small_network(0)
    net = Network(net.layers, n_features=3)
    path = tmp_path / "net.safetensors"
    save_network(net, path)
    assert load_network(path).n_features == 3
    assert network_from_state(decode_state(*encode_state(network_state(net)))).n_features == 3
    # a state saved before the width was recorded still loads, taking any width
    old = {k: v for k, v in network_state(net).items() if k != "n_features"}
    assert network_from_state(old).n_features is None
    with pytest.raises(CheckpointError, match="n_features must be an integer"):
        network_from_state(dict(network_state(net), n_features="3"))


def test_state_survives_the_checkpoint_codec() -> None:
    net = small_network(1)
    state = network_state(net)
    json.dumps({k: v for k, v in state.items() if not isinstance(v, np.ndarray)})
    tensors, skeleton = encode_state(state)
    json.dumps(skeleton)
    _same(net, network_from_state(decode_state(tensors, skeleton)))


def test_inconsistent_state_is_reported() -> None:
    state = network_state(small_network(0))
    broken = dict(state, filter_bytes=state["filter_bytes"] + 1)
    with pytest.raises(CheckpointError, match="'filters' must hold"):
        network_from_state(broken)
    with pytest.raises(CheckpointError, match="version"):
        network_from_state(dict(state, version=99))
    with pytest.raises(CheckpointError, match="not uint32"):
        network_from_state(dict(state, programs=state["programs"].astype(np.int64)))
    layers = [dict(spec) for spec in state["layers"]]
    layers[0]["combiner"] = {"kind": "nope"}
    with pytest.raises(CheckpointError, match="unknown combiner"):
        network_from_state(dict(state, layers=layers))


def test_corrupt_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_network(tmp_path / "missing.safetensors")
    path = tmp_path / "net.safetensors"
    save_network(small_network(0), path)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_network(path)
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_network(path)


def test_foreign_safetensors_file_is_rejected(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": np.zeros(3, dtype=np.float32)}, str(path))
    with pytest.raises(CheckpointError, match="not a Kiln hashtron network"):
        load_network(path)
