"""Training objectives as per-token loss weights: next token, fill-in-the-middle, chain of thought.

Every window becomes three aligned arrays of ``seq_len + 1`` entries: the tokens, the loss weight
of predicting each token, and the component each token belongs to. The model then runs once per
batch and every objective's loss comes out of the same logits (see ``jobs/lm.py``).

FIM is applied per context, after the corpus is cut into windows: each document fragment in a
window is transformed with probability ``fim_rate``. Bavarian et al. (2022) found context-level
FIM better than document-level, and it needs no re-tokenized copy of the corpus: the windows on
disk stay plain and every epoch sees fresh split points. The randomness of a window comes from a
PCG64 generator keyed by (seed, epoch, window id); the loader's cursor, which every checkpoint
holds, therefore fixes it, and resume, prefetching and any world size give the same batches.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from kiln.data.jsonl import jsonl_source, string_records
from kiln.data.tokenizer import (
    ANSWER,
    EOT,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
    PAD,
    REASONING,
    KilnTokenizer,
)
from kiln.errors import DataError

COMPONENTS = ("next_token", "fim", "cot")
NEXT_TOKEN, FIM, COT = range(len(COMPONENTS))
# Keys of the generator streams, so that training, validation and the CoT split never share one.
_TRAIN_STREAM, _VAL_STREAM, _COT_SPLIT_STREAM = 0, 1, 2
# Roles of chain-of-thought tokens, in the order of CotWeights' fields.
PROMPT_ROLE, REASONING_ROLE, ANSWER_ROLE = range(3)
COT_FIELDS = ("prompt", "reasoning", "answer")
PACKAGED_COT_EXAMPLES = "examples"


@dataclass(frozen=True)
class ComponentWeights:
    """How much each component's tokens count in the loss."""

    next_token: float = 1.0
    fim: float = 1.0
    cot: float = 1.0


@dataclass(frozen=True)
class FimSpec:
    """Fill-in-the-middle rates: share of fragments transformed, and of those the SPM share."""

    rate: float = 0.0
    spm_rate: float = 0.5


@dataclass(frozen=True)
class CotWeights:
    """Weight of each role of a chain-of-thought record (multiplied by the ``cot`` weight)."""

    prompt: float = 0.0
    reasoning: float = 1.0
    answer: float = 1.0

    def array(self) -> np.ndarray:
        return np.array([self.prompt, self.reasoning, self.answer], dtype=np.float32)


@dataclass
class WeightedWindow:
    """One window with what the loss needs per token (``seq_len + 1`` entries each)."""

    tokens: np.ndarray  # int64 token ids
    weights: np.ndarray  # float32 loss weight of predicting this token (0: not trained)
    components: np.ndarray  # int64 index into COMPONENTS

    def as_dict(self) -> dict[str, np.ndarray]:
        """Arrays keyed as the batch holds them; targets drop the first token."""
        return {
            "tokens": self.tokens,
            "weights": self.weights[1:],
            "components": self.components[1:],
        }


def window_rng(
    seed: int, epoch: int, window_id: int, *, validation: bool = False
) -> np.random.Generator:
    """The generator of one window's transformation: a pure function of its coordinates."""
    stream = _VAL_STREAM if validation else _TRAIN_STREAM
    return np.random.Generator(np.random.PCG64([seed, stream, epoch, window_id]))


# ---------------------------------------------------------------------- code windows (+ FIM)


class CodeWindows:
    """Turns plain corpus windows into weighted windows, applying FIM at the configured rates."""

    def __init__(
        self,
        tokenizer: KilnTokenizer,
        weights: ComponentWeights,
        fim: FimSpec,
        seed: int,
        *,
        validation: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.weights = weights
        self.fim = fim
        self.seed = seed
        self.validation = validation
        self._eot = tokenizer.token_id(EOT)
        self._pad = tokenizer.token_id(PAD)
        self._sentinels = tuple(tokenizer.token_id(t) for t in (FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE))

    def __call__(self, window: np.ndarray, epoch: int, window_id: int) -> dict[str, np.ndarray]:
        """The weighted window for ``window`` at its place (epoch, id) in the data order."""
        window = window.astype(np.int64)
        if self.fim.rate == 0.0:  # fast path: the window unchanged, no generator
            components = np.full(len(window), NEXT_TOKEN, dtype=np.int64)
        else:
            rng = window_rng(self.seed, epoch, window_id, validation=self.validation)
            window, components = self._apply_fim(window, rng)
        weights = np.where(
            components == FIM, self.weights.fim, self.weights.next_token
        ).astype(np.float32)
        weights[window == self._pad] = 0.0
        return WeightedWindow(window, weights, components).as_dict()

    def _apply_fim(
        self, window: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Transform each EOT-separated fragment with probability ``rate``; keep the length."""
        length = len(window)
        tokens: list[np.ndarray] = []
        components: list[np.ndarray] = []
        ends = np.flatnonzero(window == self._eot)
        start = 0
        for end in [*ends.tolist(), length]:
            fragment = window[start:end]
            separator = window[end : end + 1]  # the EOT after the fragment, if any
            start = end + 1
            if len(fragment) and rng.random() < self.fim.rate:
                fragment = self._fim_fragment(fragment, rng)
                tag = FIM
            else:
                tag = NEXT_TOKEN
            piece = np.concatenate([fragment, separator])
            tokens.append(piece)
            # The EOT closing a transformed fragment ends its middle: part of the FIM objective.
            components.append(np.full(len(piece), tag, dtype=np.int64))
        out = np.concatenate(tokens)[:length]
        tags = np.concatenate(components)[:length]
        if len(out) < length:  # re-tokenized pieces can be shorter: pad, untrained
            pad = length - len(out)
            out = np.concatenate([out, np.full(pad, self._pad, dtype=np.int64)])
            tags = np.concatenate([tags, np.full(pad, NEXT_TOKEN, dtype=np.int64)])
        return out, tags

    def _fim_fragment(self, fragment: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """PSM or SPM rendering of one fragment, split at two uniform character positions."""
        # A window edge can cut a multi-byte character: drop its bytes. The corpus is valid
        # UTF-8, so that is the only place an invalid sequence can be; a real U+FFFD stays.
        text = self.tokenizer.decode_bytes(fragment.tolist()).decode("utf-8", errors="ignore")
        lo, hi = np.sort(rng.integers(0, len(text) + 1, size=2))
        prefix, middle, suffix = text[:lo], text[lo:hi], text[hi:]
        spm = rng.random() < self.fim.spm_rate
        pre, suf, mid = self._sentinels
        encoded_prefix, encoded_middle, encoded_suffix = self.tokenizer.encode_batch(
            [prefix, middle, suffix]
        )
        if spm:
            ids = [pre, suf, *encoded_suffix, mid, *encoded_prefix, *encoded_middle]
        else:
            ids = [pre, *encoded_prefix, suf, *encoded_suffix, mid, *encoded_middle]
        return np.array(ids, dtype=np.int64)


def infill_prompt(tokenizer: KilnTokenizer, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt whose continuation is the middle between ``prefix`` and ``suffix``."""
    return [
        tokenizer.token_id(FIM_PREFIX),
        *tokenizer.encode(prefix),
        tokenizer.token_id(FIM_SUFFIX),
        *tokenizer.encode(suffix),
        tokenizer.token_id(FIM_MIDDLE),
    ]


# ---------------------------------------------------------------------- chain of thought


@dataclass(frozen=True)
class CotRecord:
    """One reasoning example: a prompt, the reasoning towards the answer, the answer."""

    prompt: str
    reasoning: str
    answer: str


def load_cot_records(path: str) -> list[CotRecord]:
    """Records of a JSONL file (``examples``: the packaged set); bad lines are DataErrors."""
    where, text = jsonl_source(
        path,
        (PACKAGED_COT_EXAMPLES, "examples/cot_python.jsonl"),
        "chain-of-thought data",
        "fix objectives.cot.path",
    )
    records = [CotRecord(**record) for _, record in string_records(text, where, COT_FIELDS)]
    if not records:
        raise DataError(f"{where} holds no chain-of-thought records")
    return records


def render_cot(tokenizer: KilnTokenizer, record: CotRecord) -> tuple[list[int], list[int]]:
    """Tokens ``prompt <|reasoning|> reasoning <|answer|> answer <|endoftext|>`` and their roles.

    Each delimiter belongs to the part it opens, so the model learns when to start reasoning,
    when to answer and when to stop.
    """
    prompt, reasoning, answer = tokenizer.encode_batch(
        [record.prompt, record.reasoning, record.answer]
    )
    tokens = [
        *prompt,
        tokenizer.token_id(REASONING),
        *reasoning,
        tokenizer.token_id(ANSWER),
        *answer,
        tokenizer.token_id(EOT),
    ]
    roles = (
        [PROMPT_ROLE] * len(prompt)
        + [REASONING_ROLE] * (1 + len(reasoning))
        + [ANSWER_ROLE] * (1 + len(answer) + 1)
    )
    return tokens, roles


class ArrayStream:
    """An in-memory token sequence with the reading interface of a shard stream."""

    def __init__(self, tokens: np.ndarray) -> None:
        self._tokens = tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)``."""
        return self._tokens[start : start + length]


@dataclass
class CotData:
    """Chain-of-thought records packed into one token sequence, with each token's role."""

    stream: ArrayStream
    roles: np.ndarray  # int64, aligned with the stream
    records: int

    @classmethod
    def build(cls, tokenizer: KilnTokenizer, records: list[CotRecord]) -> CotData:
        tokens: list[int] = []
        roles: list[int] = []
        for record in records:
            t, r = render_cot(tokenizer, record)
            tokens += t
            roles += r
        return cls(ArrayStream(np.array(tokens, dtype=np.int64)), np.array(roles), len(records))

    def content_id(self) -> str:
        """SHA-256 of the packed tokens and their roles: what a resumed loader must see again."""
        digest = hashlib.sha256(self.stream.read(0, len(self.stream)).astype("<i8").tobytes())
        digest.update(self.roles.astype("<i8").tobytes())
        return digest.hexdigest()


def split_cot_records(
    records: list[CotRecord], val_fraction: float, seed: int
) -> tuple[list[CotRecord], list[CotRecord]]:
    """A seeded split into (train, val); val gets at least one record when there are two."""
    order = np.random.Generator(np.random.PCG64([seed, _COT_SPLIT_STREAM])).permutation(
        len(records)
    )
    n_val = min(max(round(val_fraction * len(records)), 1), len(records) - 1)
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [records[i] for i in train], [records[i] for i in val]


class CotWindows:
    """Weights the windows of packed chain-of-thought data by the role of each token."""

    def __init__(
        self, data: CotData, seq_len: int, role_weights: CotWeights, weights: ComponentWeights
    ) -> None:
        self.data = data
        self.seq_len = seq_len
        self._weight_of_role = role_weights.array() * weights.cot

    def __call__(self, window: np.ndarray, _epoch: int, window_id: int) -> dict[str, np.ndarray]:
        """The weighted window for the window of id ``window_id``."""
        start = window_id * self.seq_len
        roles = self.data.roles[start : start + len(window)]
        weights = self._weight_of_role[roles]
        components = np.full(len(window), COT, dtype=np.int64)
        return WeightedWindow(window.astype(np.int64), weights, components).as_dict()
