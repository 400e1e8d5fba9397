"""Token shards on disk: written once per corpus content, verified and reused afterwards.

Layout of ``cache_dir/<key[:16]>/``: ``tokenizer.json``, raw little-endian token files
``train_00000.bin``, ``val_00000.bin``, ... and ``index.json`` (written last) with each shard's
token count and SHA-256. The key hashes every document's relative path, size and SHA-256 plus
every parameter that changes the tokens, so any change to the corpus or the settings gives a new
folder and an unchanged corpus is never tokenized twice. A folder is built under a temporary
name and renamed into place, so a reader never sees a half-written one.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.corpus import (
    CorpusStats,
    Source,
    find_files,
    iter_documents,
    resolve_root,
    root_relative,
    split_of,
)
from kiln.data.tokenizer import KilnTokenizer, train_tokenizer
from kiln.errors import DataError
from kiln.fsio import atomic_write, fsync_path, json_text, sha256_file

# 2: the tokenizer reserves the chain-of-thought delimiters as special tokens.
FORMAT_VERSION = 2
SPLITS = ("train", "val")
INDEX = "index.json"
TOKENIZER = "tokenizer.json"
# Shards are little-endian whatever the host; the index names the dtype without byte order.
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Documents handed to the (multi-threaded) batch encoder at once: bounds memory, keeps it busy.
_ENCODE_BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class _Doc:
    """A readable document found by the scan, with what the key and split need."""

    path: Path
    relative: str
    size: int
    sha256: str
    split: str


@dataclass
class TokenData:
    """A verified token cache folder: its tokenizer, its index and a stream per split."""

    root: Path
    tokenizer: KilnTokenizer
    index: dict

    def split(self, name: str) -> TokenStream:
        """The token stream of split ``name`` (``"train"`` or ``"val"``)."""
        if name not in self.index["splits"]:
            raise ValueError(f"unknown split {name!r}; have {sorted(self.index['splits'])}")
        return TokenStream(
            self.root, self.index["splits"][name]["shards"], _DTYPES[self.index["dtype"]]
        )


class TokenStream:
    """One split's shards as a single token sequence, memory-mapped lazily, never loaded whole."""

    def __init__(self, root: Path, shards: Sequence[dict], dtype: np.dtype) -> None:
        self._paths = [root / shard["file"] for shard in shards]
        self._sizes = [int(shard["num_tokens"]) for shard in shards]
        self._starts = list(itertools.accumulate(self._sizes, initial=0))
        self._maps: list[np.memmap | None] = [None] * len(shards)
        self._dtype = dtype

    def __len__(self) -> int:
        return self._starts[-1]

    def _shard(self, i: int) -> np.memmap:
        if self._maps[i] is None:
            self._maps[i] = np.memmap(
                self._paths[i], dtype=self._dtype, mode="r", shape=(self._sizes[i],)
            )
        return self._maps[i]

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` as a new int64 array, across shard boundaries."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) outside a stream of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        done = 0
        while done < length:
            pos = start + done
            i = bisect.bisect_right(self._starts, pos) - 1
            offset = pos - self._starts[i]
            take = min(length - done, self._sizes[i] - offset)
            out[done : done + take] = self._shard(i)[offset : offset + take]
            done += take
        return out


def verify_index(root: Path, deep: bool) -> dict:
    """Load ``root/index.json`` and check every file it lists; return the index.

    Always checks that each file exists and each shard has exactly ``num_tokens * itemsize``
    bytes: one ``stat`` per file, which catches missing, truncated and half-written shards.
    ``deep=True`` also re-hashes every byte against the recorded SHA-256 (catches flipped or
    overwritten bytes); reuse skips that because it reads the whole cache on every start.
    """
    path = Path(root) / INDEX
    redo = f"delete {root} and rerun to rebuild it"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"token index {path} is missing; {redo}") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"token index {path} is unreadable or not JSON ({exc}); {redo}") from exc
    try:
        if index["format_version"] != FORMAT_VERSION:
            raise DataError(
                f"{path} has format {index['format_version']}, expected {FORMAT_VERSION}; {redo}"
            )
        itemsize = _DTYPES[index["dtype"]].itemsize
        files = [(index["tokenizer"]["file"], None, index["tokenizer"]["sha256"])]
        for split in SPLITS:
            info = index["splits"][split]
            counts = [shard["num_tokens"] for shard in info["shards"]]
            valid = all(isinstance(n, int) and n > 0 for n in counts)
            if not valid or sum(counts) != info["tokens"]:
                raise DataError(f"{path}: {split} shard token counts are inconsistent; {redo}")
            files += [(s["file"], s["num_tokens"] * itemsize, s["sha256"]) for s in info["shards"]]
    except (KeyError, TypeError) as exc:
        raise DataError(f"token index {path} is malformed (bad field {exc}); {redo}") from exc
    for name, size, digest in files:
        if not isinstance(name, str) or Path(name).name != name:
            raise DataError(f"{path} lists {name!r}, not a file name in {root}; {redo}")
        file = Path(root) / name
        try:
            actual = file.stat().st_size
        except OSError:
            raise DataError(f"{file}, listed in {path}, is missing; {redo}") from None
        if size is not None and actual != size:
            raise DataError(
                f"{file} has {actual} bytes but {path} records {size} (truncated or "
                f"overwritten); {redo}"
            )
        if deep and sha256_file(file) != digest:
            raise DataError(f"{file} does not match its SHA-256 in {path} (corrupt); {redo}")
    return index


def prepare_token_data(
    sources: Sequence[Source],
    cache_dir: Path,
    *,
    vocab_size: int,
    min_frequency: int,
    val_fraction: float,
    split_seed: int,
    shard_tokens: int,
    max_files: int | None,
    tokenizer_train_bytes: int,
    log: Callable[[str], None] = print,
) -> TokenData:
    """Tokenized train/val shards of the corpus, reused from ``cache_dir`` when unchanged.

    A cached folder is reused after a shallow :func:`verify_index`; if it fails, the failure is
    logged and the folder rebuilt. The tokenizer is trained on the train split only, on its first
    ``tokenizer_train_bytes`` bytes in file order. Each document's tokens are followed by EOT.
    """
    params = {
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "min_frequency": min_frequency,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "shard_tokens": shard_tokens,
        "tokenizer_train_bytes": tokenizer_train_bytes,
    }
    roots = [resolve_root(source.root) for source in sources]
    stats = CorpusStats()
    files = find_files(sources, stats, max_files)
    docs, key = _scan(files, roots, params, stats)
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped_by_reason.items()))
    log(
        f"corpus: {stats.files_read} files read ({stats.bytes_read:,} bytes), "
        f"{stats.files_skipped} skipped" + (f" ({reasons})" if reasons else "")
    )
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / key[:16]
    if final.exists():
        try:
            data = _open(final, key)
        except DataError as exc:
            log(f"token cache {final} failed verification, rebuilding: {exc}")
            _discard(final)
        else:
            log(f"reusing token shards {final} ({_summary(data.index)})")
            return data
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed process that had our pid
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise DataError(
            f"cannot make the token cache in {cache_dir} ({exc.strerror or exc}); fix "
            "data.cache_dir: a folder Kiln can write to (it is created if missing)"
        ) from exc
    try:
        index = _build(docs, stats, key, params, tmp, log)
        try:
            os.rename(tmp, final)
        except OSError:  # another process published the same key first; its data is identical
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"another process built {final} first; using it")
        else:
            fsync_path(cache_dir)
            log(f"token shards written to {final} ({_summary(index)})")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _open(final, key)


def _scan(
    files: Sequence[Path], roots: Sequence[Path], params: dict[str, Any], stats: CorpusStats
) -> tuple[list[_Doc], str]:
    """Read every file once, counting into ``stats``: readable documents with their split, and
    the content key."""
    key = hashlib.sha256()
    docs: list[_Doc] = []
    for path, _, nbytes, sha256 in iter_documents(files, stats):
        relative = root_relative(path, roots)
        split = split_of(path, relative, params["val_fraction"], params["split_seed"])
        doc = _Doc(path, relative, nbytes, sha256, split)
        key.update(json.dumps([doc.relative, doc.size, doc.sha256]).encode() + b"\n")
        docs.append(doc)
    if not docs:
        raise DataError(
            f"none of the {len(files)} corpus files is usable (skipped: "
            f"{stats.skipped_by_reason}); point data.sources at UTF-8 text files"
        )
    # The skip counts go into the index, so they are part of what the key identifies.
    tail = {"params": params, "skipped": stats.skipped_by_reason}
    key.update(json.dumps(tail, sort_keys=True).encode())
    if params["val_fraction"] > 0 and all(doc.split == "train" for doc in docs):
        docs[-1] = replace(docs[-1], split="val")
    if len(docs) == 1:
        raise DataError(
            f"the train split is empty: the corpus has 1 usable document ({docs[0].path}), "
            "which is held out for validation; at least 2 are needed: add files, raise "
            "data.max_files or widen data.sources"
        )
    if all(doc.split == "val" for doc in docs):
        raise DataError(
            f"the train split is empty: all {len(docs)} documents went to val "
            f"(val_fraction={params['val_fraction']}); add files or lower data.val_fraction"
        )
    return docs, key.hexdigest()


def _open(root: Path, key: str) -> TokenData:
    """A cache folder after checking its index, key and tokenizer."""
    index = verify_index(root, deep=False)
    if index.get("key") != key:
        raise DataError(f"{root / INDEX} has key {index.get('key')}, expected {key}")
    tokenizer = KilnTokenizer.load(root / TOKENIZER)
    if tokenizer.fingerprint() != index["tokenizer"].get("fingerprint"):
        raise DataError(f"{root / TOKENIZER} does not match the fingerprint in {root / INDEX}")
    return TokenData(root=root, tokenizer=tokenizer, index=index)


def _discard(folder: Path) -> None:
    """Remove a bad cache folder; rename first so no reader sees it half-deleted."""
    trash = folder.with_name(f".stale-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process already removed it
        return
    shutil.rmtree(trash, ignore_errors=True)


def _summary(index: dict) -> str:
    return ", ".join(
        f"{split}: {index['splits'][split]['documents']} docs, "
        f"{index['splits'][split]['tokens']:,} tokens"
        for split in SPLITS
    )


def _build(
    docs: list[_Doc],
    stats: CorpusStats,
    key: str,
    params: dict[str, Any],
    folder: Path,
    log: Callable[[str], None],
) -> dict:
    """Train the tokenizer, write every split's shards and the index into ``folder``."""
    train = [doc for doc in docs if doc.split == "train"]
    log(
        f"training tokenizer (vocab {params['vocab_size']}) on up to "
        f"{params['tokenizer_train_bytes']:,} bytes of {len(train)} train documents"
    )
    texts = (text for _, text in _reread(train))
    tokenizer = train_tokenizer(
        _take_bytes(texts, params["tokenizer_train_bytes"]),
        params["vocab_size"],
        params["min_frequency"],
    )
    tokenizer.save(folder / TOKENIZER)
    if tokenizer.vocab_size < params["vocab_size"]:
        log(
            f"note: the tokenizer has {tokenizer.vocab_size} tokens, fewer than "
            f"data.tokenizer.vocab_size {params['vocab_size']}: no other pair occurs "
            f"min_frequency ({params['min_frequency']}) times in the training text; the model "
            "uses the smaller vocabulary (add data to get more)"
        )
    dtype_name = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    dtype = _DTYPES[dtype_name]
    writers = {s: _ShardWriter(folder, s, params["shard_tokens"], dtype) for s in SPLITS}
    log(f"encoding {len(docs)} documents into shards of <= {params['shard_tokens']:,} tokens")
    for batch in _batches(_reread(docs)):
        encoded = tokenizer.encode_batch([text for _, text in batch])
        for (doc, _), ids in zip(batch, encoded, strict=True):
            writers[doc.split].add_document(np.array([*ids, tokenizer.eot_id], dtype=dtype))
    index = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "params": params,
        "dtype": dtype_name,
        "tokenizer": {
            "file": TOKENIZER,
            "sha256": sha256_file(folder / TOKENIZER),
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
        },
        "corpus": asdict(stats),
        "splits": {split: writer.close() for split, writer in writers.items()},
    }
    fsync_path(folder)
    atomic_write(folder / INDEX, json_text(index, indent=2, sort_keys=True))
    return index


def _reread(docs: Sequence[_Doc]) -> Iterator[tuple[_Doc, str]]:
    """Stream the documents again; one that changed since the scan is an error, not a mix."""
    expected = iter(docs)
    stats = CorpusStats()
    for path, text, _, sha256 in iter_documents([doc.path for doc in docs], stats):
        doc = next(expected)
        if doc.path != path or sha256 != doc.sha256:
            raise DataError(f"{doc.path} changed while token shards were built; rerun")
        yield doc, text
    if stats.files_skipped:
        raise DataError(f"a corpus file became unreadable while token shards were built: {stats}")


def _take_bytes(texts: Iterable[str], budget: int) -> Iterator[str]:
    """The leading texts up to ``budget`` UTF-8 bytes in all; the last one cut to fit."""
    for text in texts:
        if budget <= 0:
            return
        data = text.encode("utf-8")
        if len(data) > budget:
            text = data[:budget].decode("utf-8", errors="ignore")  # drop a split character
        budget -= len(data)
        yield text


def _batches(items: Iterable[tuple[_Doc, str]]) -> Iterator[list[tuple[_Doc, str]]]:
    batch: list[tuple[_Doc, str]] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item[0].size
        if size >= _ENCODE_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _ShardWriter:
    """Appends one split's token stream to ``<split>_NNNNN.bin`` files of at most N tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype) -> None:
        self._folder = folder
        self._split = split
        self._capacity = shard_tokens
        self._dtype = dtype
        self._handle: Any = None
        self._hash = hashlib.sha256()
        self._count = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.tokens = 0

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document's tokens (EOT included); it may continue into the next shard."""
        self.documents += 1
        while len(ids):
            if self._handle is None:
                name = f"{self._split}_{len(self.shards):05d}.bin"
                self._handle = open(self._folder / name, "wb")  # noqa: SIM115 - spans calls
                self._hash = hashlib.sha256()
                self._count = 0
            take = min(len(ids), self._capacity - self._count)
            chunk = ids[:take].tobytes()
            self._handle.write(chunk)
            self._hash.update(chunk)
            self._count += take
            self.tokens += take
            ids = ids[take:]
            if self._count == self._capacity:
                self._finish()

    def _finish(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        name = Path(self._handle.name).name
        digest = self._hash.hexdigest()
        self.shards.append({"file": name, "num_tokens": self._count, "sha256": digest})
        self._handle = None

    def close(self) -> dict:
        """Finish the open shard; the split's entry for the index."""
        if self._handle is not None:
            self._finish()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}
