"""The chunk protocol: GPT and nn.Sequential chunks, ownership of tied parameters, bad models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.models.gpt import GPT, GPTShape
from kiln.streaming.chunks import StreamChunk, assemble, build_plan, model_chunks


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTShape(vocab_size=50, context=16, n_layers=3, n_heads=2, d_model=32,
                        mlp_ratio=4, dropout=0.0, bias=True, layernorm_eps=1e-5, init_std=0.02))


def test_gpt_chunks_chained_are_its_forward_bit_for_bit() -> None:
    model = _gpt()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    x = idx
    for chunk in model.stream_chunks():
        x = chunk.module(x)
    assert [c.name for c in model.stream_chunks()] == ["embed", "block0", "block1", "block2",
                                                       "head"]
    assert torch.equal(x, model(idx))


def test_the_tied_head_borrows_the_embedding_its_first_user_owns() -> None:
    model = _gpt()
    plan = build_plan(model)
    assert plan.owner["tok_emb.weight"] == 0
    assert plan.owned[-1] == ["ln_f.weight", "ln_f.bias"]
    assert plan.borrowed(plan.last) == ["tok_emb.weight"]
    assert plan.needed(plan.last) == [plan.last, 0]
    assert sorted(n for owned in plan.owned for n in owned) == sorted(plan.params)
    assert list(plan.params) == [n for n, _ in model.named_parameters()]
    assert ("head.weight", "tok_emb.weight") in plan.state_keys


def test_a_sequential_model_streams_one_chunk_per_child() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    chunks = model_chunks(model)
    assert [c.name for c in chunks] == ["0.Linear", "1.GELU", "2.Linear"]
    plan = build_plan(model)
    assert plan.owned == [["0.weight", "0.bias"], [], ["2.weight", "2.bias"]]


def test_models_without_chunks_or_with_buffers_are_refused() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="stream_chunks"):
        build_plan(Plain())
    with pytest.raises(ConfigError, match="persistent buffers"):
        build_plan(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_chunks_that_miss_a_parameter_are_refused() -> None:
    class Partial(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

        def stream_chunks(self) -> list:
            from kiln.streaming.chunks import StreamChunk

            return [StreamChunk("a", self.a)]

    with pytest.raises(ConfigError, match=r"do not use parameters \['b.weight', 'b.bias'\]"):
        build_plan(Partial())


@pytest.mark.parametrize("name", ["blocks/0", "", "tab\there", "x" * 201])
def test_a_chunk_name_that_cannot_be_part_of_a_file_name_is_refused(name: str) -> None:
    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def stream_chunks(self) -> list:
            from kiln.streaming.chunks import StreamChunk

            return [StreamChunk(name, self.a)]

    with pytest.raises(
        ConfigError,
        match=r"Named.stream_chunks\(\) names a chunk .*cannot be "
        r"part of a file name; give each StreamChunk a non-empty name",
    ):
        build_plan(Named())


class _Rows(nn.Module):
    """A (6, 2) stack of vectors, used by two chunks as row ranges ``first`` and ``second``."""

    def __init__(self, first: range, second: range | None, whole_too: bool = False) -> None:
        super().__init__()
        self.stack = nn.Parameter(torch.arange(12.0).view(6, 2))
        self.other = nn.Parameter(torch.zeros(3))
        self.first, self.second, self.whole_too = first, second, whole_too

    def stream_chunks(self) -> list[StreamChunk]:
        chunks = [StreamChunk("a", _Holds(self.stack), {self.stack: self.first})]
        if self.second is not None:
            chunks.append(StreamChunk("b", _Holds(self.stack), {self.stack: self.second}))
        if self.whole_too:
            chunks.append(StreamChunk("c", _Holds(self.stack)))
        return [*chunks, StreamChunk("other", _Holds(self.other))]


class _Holds(nn.Module):
    def __init__(self, p: nn.Parameter) -> None:
        super().__init__()
        self.p = p


def test_row_ranges_of_a_stacked_parameter_are_pieces_owned_like_parameters() -> None:
    model = _Rows(range(0, 4), range(4, 6))
    plan = build_plan(model)
    assert list(plan.params) == ["stack[0:4]", "stack[4:6]", "other"]
    assert plan.owned == [["stack[0:4]"], ["stack[4:6]"], ["other"]]
    assert plan.pieces == {"stack": ["stack[0:4]", "stack[4:6]"]}
    assert plan.shapes["stack[4:6]"] == (2, 2) and plan.whole_shape("stack[4:6]") == (6, 2)
    assert torch.equal(plan.data("stack[4:6]"), model.stack[4:].detach())
    pieces = {n: plan.data(n) for n in plan.params}
    assert torch.equal(assemble(pieces, plan.pieces)["stack"], model.stack.detach())
    assert plan.state_keys == [("stack", "stack"), ("other", "other")]


@pytest.mark.parametrize(
    ("first", "second", "whole_too"),
    [(range(0, 4), range(3, 6), False), (range(0, 3), range(4, 6), False),
     (range(0, 4), None, False), (range(0, 4), range(4, 6), True)],
    ids=["overlap", "gap", "short", "whole-too"],
)
def test_row_ranges_must_cover_the_parameter_exactly_once(
    first: range, second: range | None, whole_too: bool
) -> None:
    with pytest.raises(ConfigError, match=r"parameter 'stack' .* every row exactly once"):
        build_plan(_Rows(first, second, whole_too))


def test_rows_outside_the_parameter_or_of_a_foreign_parameter_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"rows range\(4, 8\) .* within dim 0"):
        build_plan(_Rows(range(0, 4), range(4, 8)))
    model = _Rows(range(0, 6), None)
    chunks = model.stream_chunks()
    chunks[0].rows[model.other] = range(0, 1)
    model.stream_chunks = lambda: chunks  # type: ignore[method-assign]
    with pytest.raises(ConfigError, match="rows of a parameter its module does not use"):
        build_plan(model)
