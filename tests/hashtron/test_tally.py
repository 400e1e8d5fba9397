"""The tally: vectorised flip-test votes against the one-sample-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest
from hashtron_nets import small_network
from hashtron_scalar import hash_scalar, tally_votes_scalar

from kiln.hashtron import LayerSpec, Network, Neuron, isalnum, tally
from kiln.hashtron.neuron import run_program
from kiln.hashtron.tally import VOTE_MODES


def _data(net: Network, seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**32, (n, 3), dtype=np.uint64).astype(np.uint32)
    # labels near the current outputs, so that flips matter in every vote mode
    y = net.forward(x) ^ rng.integers(0, 2, n).astype(np.uint64)
    return x, y


@pytest.mark.parametrize("vote", VOTE_MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_votes_match_scalar_flip_test(seed: int, vote: str) -> None:
    net = small_network(seed)
    x, y = _data(net, seed)
    for layer, neuron in [(0, 1), (0, 5), (1, 2), (2, 1)]:
        t = tally(net, x, y, layer, neuron, vote=vote)
        expect = tally_votes_scalar(net, x.tolist(), y.tolist(), layer, neuron, vote)
        assert t.votes.tolist() == expect, (layer, neuron)
        assert t.n == len(x) and t.total == sum(expect)


def test_keys_inputs_and_sums() -> None:
    net = small_network(1)
    x, y = _data(net, 5, n=300)
    layer, neuron = 1, 3
    t = tally(net, x, y, layer, neuron, program=[(77, 16)])
    # the neuron's input: layer 1 has no premodulo, so it is its feature from the combiner
    feats = net.features(x, layer)
    assert (t.inputs == feats[:, neuron % feats.shape[1]]).all()
    assert t.keys.tolist() == [hash_scalar(int(v), 77, 16) for v in t.inputs]
    assert (t.unique_keys == np.unique(t.keys)).all()
    for key, s in zip(t.unique_keys, t.key_sums, strict=True):
        assert s == t.votes[t.keys == key].sum()
    keys, wanted = t.training_set()
    assert set(keys.tolist()) == set(t.unique_keys[t.key_sums != 0].tolist())
    assert (wanted == (t.key_sums[t.key_sums != 0] > 0)).all()
    assert t.total == t.votes.sum() and t.margin == abs(t.total) / t.n
    assert t.voters == np.count_nonzero(t.votes)
    assert (t.current == net.layers[layer].forward(feats)[:, neuron]).all()
    # without a program override the neuron's own program keys the votes
    own = tally(net, x, y, layer, neuron)
    program = net.layers[layer].neurons[neuron].program
    assert (own.keys == run_program(program, own.inputs)).all()
    assert (own.votes == t.votes).all()


def test_last_layer_votes_are_the_label_bits() -> None:
    net = small_network(0)
    x, _ = _data(net, 1, n=200)
    y = np.random.default_rng(2).integers(0, 4, 200).astype(np.uint64)
    for neuron in range(2):
        for vote in VOTE_MODES[:2]:
            t = tally(net, x, y, 2, neuron, vote=vote)
            assert (t.votes == 2 * ((y >> np.uint64(neuron)) & np.uint64(1)).astype(int) - 1).all()
            assert -t.n <= t.total <= t.n


def test_sign_sum_is_bounded_and_hamming_can_weigh_more() -> None:
    net = small_network(1)
    x, y = _data(net, 9, n=400)
    for layer, neuron in [(0, 0), (0, 7), (1, 1)]:
        sign = tally(net, x, y, layer, neuron, vote="sign")
        ham = tally(net, x, y, layer, neuron, vote="hamming")
        assert -sign.n <= sign.total <= sign.n
        assert (np.sign(ham.votes) == sign.votes).all()
        assert np.abs(ham.votes).max(initial=0) <= net.output_bits


def test_training_a_single_neuron_from_its_tally_fits_isalnum() -> None:
    ds = isalnum()
    net = Network.random([LayerSpec(1)], np.random.default_rng(0))
    program = [(123, 2**20)]
    t = tally(net, ds.features, ds.labels, 0, 0, program=program)
    assert t.voters == 256 and t.total == 2 * 62 - 256  # 62 alphanumerics: the prior
    net.layers[0].set_neuron(0, Neuron(program).fit(*t.training_set()))
    assert net.accuracy(ds.features, ds.labels) == 1.0


def test_bad_arguments() -> None:
    net = small_network(0)
    x, y = _data(net, 0, n=10)
    with pytest.raises(ValueError, match="vote"):
        tally(net, x, y, 0, 0, vote="majority")
    with pytest.raises(IndexError):
        tally(net, x, y, 3, 0)
    with pytest.raises(IndexError):
        tally(net, x, y, 2, 2)


def test_rekeyed_and_tally_features_agree_with_tally() -> None:
    from kiln.hashtron.tally import tally_features

    net = small_network(1)
    x, y = _data(net, 3, n=200)
    for layer, neuron in [(0, 4), (1, 2), (2, 0)]:
        program = [(99, 37)]
        direct = tally(net, x, y, layer, neuron, program=program)
        rekeyed = tally(net, x, y, layer, neuron).rekeyed(program)
        feats = net.features(x, layer)
        cached = tally_features(net, feats, y, layer, neuron, program=program,
                                bits=net.layers[layer].forward(feats))
        for t in (rekeyed, cached):
            assert (t.keys == direct.keys).all() and (t.votes == direct.votes).all()
            assert (t.unique_keys == direct.unique_keys).all()
            assert (t.key_sums == direct.key_sums).all() and t.total == direct.total
        assert (net.layers[layer].neuron_inputs(feats, neuron) ==
                net.layers[layer].inputs(feats)[:, neuron]).all()
