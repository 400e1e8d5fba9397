"""Round trips of training state through encode_state / JSON / safetensors / decode_state."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.torch import load, save

from kiln.state_codec import decode_state, encode_state


def round_trip(obj):
    """Encode, push through strict JSON and safetensors bytes, decode."""
    tensors, skeleton = encode_state(obj)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))
    return decode_state(load(save(tensors)), skeleton)


def assert_same(a, b, where="state"):
    """Equal in value and type, recursively; floats and arrays are compared bit for bit.

    Dict subclasses such as the OrderedDict of ``Module.state_dict()`` come back as plain dicts.
    """
    assert (dict if isinstance(a, dict) else type(a)) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.contiguous().reshape(-1).view(torch.uint8).tolist() == (
            b.contiguous().reshape(-1).view(torch.uint8).tolist()
        ), where
    elif isinstance(a, (np.ndarray, np.generic)):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        ), where
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


TAGS = ["__tensor__", "__ndarray__", "__tuple__", "__bytes__", "__float__", "__dict__"]
TORCH_DTYPES = [
    torch.float32,
    torch.float64,
    torch.bfloat16,
    torch.float16,
    torch.int64,
    torch.bool,
]
NUMPY_DTYPES = ["<u4", "<u8", "<i8", "<f8", "|b1", "|u1", "<c16", ">i4", "<M8[s]", "<U3"]

tensors = st.builds(
    lambda values, dtype: torch.tensor(values).to(dtype),
    st.lists(st.floats(-1e4, 1e4, width=32), max_size=6),
    st.sampled_from(TORCH_DTYPES),
)
arrays = st.sampled_from(NUMPY_DTYPES).flatmap(
    lambda dtype: hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
)
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | tensors
    | arrays
)
keys = st.text(max_size=6) | st.integers() | st.sampled_from(TAGS) | st.none()
states = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), children, max_size=4)
        | st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(states)
def test_any_nested_state_round_trips(state):
    assert_same(state, round_trip(state))


def test_adamw_state_dict_round_trips_and_resumes_identically():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.95))
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()

    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    restored = round_trip(saved)
    assert_same(saved, restored)
    assert list(restored["optimizer"]["state"]) == [0, 1]  # int keys stay ints
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)

    twin = torch.nn.Linear(4, 3)
    twin_optimizer = torch.optim.AdamW(twin.parameters(), lr=0.5)
    twin.load_state_dict(restored["model"])
    twin_optimizer.load_state_dict(restored["optimizer"])
    batch = torch.randn(5, 4)
    for net, opt in ((model, optimizer), (twin, twin_optimizer)):
        opt.zero_grad()
        net(batch).sum().backward()
        opt.step()
    assert torch.equal(model.weight, twin.weight)
    assert torch.equal(model.bias, twin.bias)


def test_torch_rng_state_round_trips():
    state = torch.get_rng_state()
    restored = round_trip({"cpu": state})["cpu"]
    assert_same(state, restored)
    expected = torch.rand(5)
    torch.set_rng_state(restored)
    assert torch.equal(torch.rand(5), expected)


def test_numpy_rng_state_round_trips_exactly():
    rng = np.random.RandomState(1234)
    rng.standard_normal()  # leaves a cached gaussian in the state
    state = rng.get_state()
    restored = round_trip(state)
    assert_same(state, restored)
    assert restored[1].dtype == np.uint32
    expected = rng.random_sample(4)
    rng.set_state(restored)
    assert rng.random_sample(4).tolist() == expected.tolist()


def test_python_rng_state_round_trips():
    generator = random.Random(99)
    state = generator.getstate()
    restored = round_trip(state)
    assert restored == state
    assert_same(state, restored)
    expected = [generator.random() for _ in range(3)]
    generator.setstate(restored)
    assert [generator.random() for _ in range(3)] == expected


def test_grad_scaler_like_dict_round_trips():
    state = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
        "found_inf": float("inf"),
        "last_loss": float("nan"),
    }
    assert_same(state, round_trip(state))


def test_tensors_become_contiguous_cpu_copies_and_aliases_are_stored_once():
    base = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    state = {"weight": base, "tied": base, "view": base.t(), "row": base[1]}
    tensors, skeleton = encode_state(state)
    assert len(tensors) == 3  # "tied" reuses the key of "weight"
    assert skeleton["tied"] == skeleton["weight"] == {"__tensor__": "t0"}
    for tensor in tensors.values():
        assert tensor.is_contiguous() and tensor.device.type == "cpu"
        assert tensor.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    base.zero_()  # the encoded copy is a snapshot
    restored = decode_state(load(save(tensors)), skeleton)
    assert restored["weight"] is restored["tied"]
    assert restored["view"].tolist() == torch.arange(12).reshape(3, 4).t().tolist()
    assert restored["row"].tolist() == [4, 5, 6, 7]
    assert restored["view"].dtype == torch.bfloat16


def test_skeleton_uses_documented_tags():
    tensors, skeleton = encode_state(
        {1: (b"\x00", float("-inf")), "a": [torch.zeros(1), np.zeros(2, np.uint32)]}
    )
    assert list(tensors) == ["t0", "t1"]
    assert skeleton == {
        "__dict__": [
            [1, {"__tuple__": [{"__bytes__": "AA=="}, {"__float__": "-inf"}]}],
            [
                "a",
                [
                    {"__tensor__": "t0"},
                    {"__ndarray__": "t1", "dtype": "<u4", "shape": [2]},
                ],
            ],
        ]
    }


def test_numpy_scalars_stay_numpy_scalars():
    state = {"f": np.float64(0.25), "i": np.int64(-3), "u": np.uint32(7)}
    restored = round_trip(state)
    assert_same(state, restored)


def test_unsupported_type_names_its_path():
    with pytest.raises(TypeError, match=r"set at state\['a'\]\[1\]"):
        encode_state({"a": [1, {2}]})
    with pytest.raises(TypeError, match="numpy dtype object"):
        encode_state(np.array([None]))


def test_malformed_skeleton_raises_value_error():
    with pytest.raises(ValueError, match="t9"):
        decode_state({}, {"x": {"__tensor__": "t9"}})
    with pytest.raises(ValueError, match="__float__"):
        decode_state({}, {"__float__": "huge"})
