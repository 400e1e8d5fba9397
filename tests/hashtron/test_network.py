"""Network forward against the scalar reference; architecture and data validation."""

from __future__ import annotations

import numpy as np
import pytest
from hashtron_nets import small_network
from hashtron_scalar import network_forward_scalar

from kiln.errors import ConfigError, DataError
from kiln.hashtron import Full, Layer, LayerSpec, MajPool2D, Network, Neuron, Sum


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_forward_matches_scalar(seed: int) -> None:
    net = small_network(seed)
    rng = np.random.default_rng(100 + seed)
    x = rng.integers(0, 2**32, (40, 3), dtype=np.uint64).astype(np.uint32)
    codes = net.forward(x)
    assert codes.dtype == np.uint64 and codes.shape == (40,)
    assert codes.tolist() == [network_forward_scalar(net, row.tolist()) for row in x]


def test_neuron_i_reads_feature_i_mod_f_and_1d_input_is_one_feature() -> None:
    net = small_network(1)
    x = np.arange(50, dtype=np.uint32) * 1000003
    assert (net.forward(x) == net.forward(x[:, None])).all()
    layer = net.layers[0]
    feats = np.stack([x, x + 1], axis=1)
    inputs = layer.inputs(feats)
    assert inputs.shape == (50, layer.width)
    assert (layer.inputs(feats[:, [1]])[:, 1] == inputs[:, 1]).all()


def test_set_neuron_changes_the_output() -> None:
    net = small_network(0)
    x = np.arange(200, dtype=np.uint32)
    last = net.layers[-1]
    flipped = Neuron((), 1).fit(np.arange(2**8), np.ones(2**8, bool))  # always 1 on [0, 2**8)
    last.set_neuron(0, flipped)
    assert (net.forward(x) & 1 == 1).all()
    assert net.n_neurons == 12 + 5 + 2 and net.nbytes > 0 and net.output_bits == 2


def test_random_network_is_seeded() -> None:
    specs = [LayerSpec(6, 16, Sum((6,))), LayerSpec(2)]
    a = Network.random(specs, np.random.default_rng(3))
    b = Network.random(specs, np.random.default_rng(3))
    assert [layer.neurons for layer in a.layers] == [layer.neurons for layer in b.layers]


def test_accuracy() -> None:
    net = Network([Layer([Neuron((), 1)])])  # no filter, empty program: the input's parity
    x = np.arange(10)
    assert net.accuracy(x, x % 2) == 1.0
    assert net.accuracy(x, np.zeros(10, int)) == 0.5


def test_architecture_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ConfigError, match=r"layers\[0\] needs a combiner"):
        Network([Layer.random(3, rng), Layer.random(1, rng)])
    with pytest.raises(ConfigError, match="remove its combiner"):
        Network([Layer.random(3, rng, combiner=Sum((3,)))])
    with pytest.raises(ConfigError, match=r"layers\[0\]\.combiner: majpool2d needs"):
        Network([Layer.random(5, rng, combiner=MajPool2D(2, 1, 2, 1, 2, 1)),
                 Layer.random(1, rng)])
    with pytest.raises(ConfigError, match="need 7 input neurons"):
        Network.random([LayerSpec(6, 0, Full(3, 4)), LayerSpec(2)], rng)
    with pytest.raises(ConfigError, match="at most 64"):
        Network.random([LayerSpec(65)], rng)
    with pytest.raises(ConfigError, match="premodulo"):
        Layer.random(2, rng, premodulo=-1)
    with pytest.raises(ConfigError, match="at least one layer"):
        Network([])


def test_a_network_that_knows_its_input_width_refuses_another() -> None:
    # neuron i of the first layer reads feature i % F: 3 features instead of 4 would give
    # answers, just not the trained network's
    specs = [LayerSpec(8, 0, Sum((8,))), LayerSpec(1)]
    net = Network.random(specs, np.random.default_rng(0), n_features=4)
    x = np.arange(40, dtype=np.uint32).reshape(10, 4)
    assert net.forward(x).shape == (10,) and net.features(x, 1).shape == (10, 1)
    for bad in (x[:, :3], np.arange(10)):
        with pytest.raises(DataError, match=r"reads 4 .* shape \[samples, 4\]"):
            net.forward(bad)
    with pytest.raises(DataError, match="got 3 per sample"):
        net.accuracy(x[:, :3], np.zeros(10, int))
    anyw = Network.random(specs, np.random.default_rng(0))  # width not known: any is taken
    assert anyw.n_features is None and anyw.forward(x[:, :3]).shape == (10,)
    with pytest.raises(ConfigError, match="n_features must be an integer >= 1"):
        Network.random(specs, np.random.default_rng(0), n_features=0)


def test_data_errors() -> None:
    net = Network.random([LayerSpec(2)], np.random.default_rng(0))
    with pytest.raises(DataError, match="integers"):
        net.forward(np.array([0.5, 1.5]))
    with pytest.raises(DataError, match=r"\[0, 2\*\*32\)"):
        net.forward(np.array([-3, 1]))
    with pytest.raises(DataError, match="shape"):
        net.forward(np.zeros((2, 2, 2), dtype=np.uint32))
    with pytest.raises(DataError, match="widen the last layer"):
        net.accuracy(np.arange(3), np.array([0, 1, 4]))
    with pytest.raises(DataError, match="one label per sample"):
        net.accuracy(np.arange(3), np.array([0, 1]))
