"""Byte-level language-model data for examples/train_lm.py: a corpus, packed sequences, batches.

    corpus   = load_stdlib_corpus()            # or load_text_files(["notes.txt", "src/"])
    batches  = PackedBatches(corpus.train, seq_len=128, batch_size=32, seed=0)
    tokens   = next(batches)                   # (32, 129) int32: inputs [:, :-1], targets [:, 1:]
    position = batches.state_dict()            # saved with the checkpoint; load_state_dict() resumes

Tokens are bytes (vocabulary 256). Documents (files) are joined with a NUL byte, which no text file
contains, as the end-of-document token. The train/validation split is per file and depends only on
each file's relative path, so it is the same on every run and independent of the read order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
import zlib

import numpy as np

VOCAB_SIZE = 256
EOD = 0  # end-of-document token: the NUL byte
DEFAULT_MAX_BYTES = 8_000_000
DEFAULT_VAL_FRACTION = 0.05
# Standard-library directories left out: installed packages, test data (deliberately broken or odd
# files), generated tables.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings"}


class DataError(ValueError):
    """A corpus that cannot be used: a missing path, an empty or undecodable file, too little text."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Train and validation token streams (uint8 bytes, documents joined by EOD) and where from."""

    train: np.ndarray  # [N_train] uint8
    val: np.ndarray  # [N_val] uint8
    description: str

    def summary(self) -> str:
        return (f"{self.description}: {self.train.size:,} train bytes, "
                f"{self.val.size:,} validation bytes")


def _is_val(relpath: str, val_fraction: float) -> bool:
    """The file-level split: a stable hash of the relative path, thresholded."""
    return zlib.crc32(relpath.encode()) % 10_000 < val_fraction * 10_000


def _pack(docs: list[bytes]) -> np.ndarray:
    """Documents -> one uint8 stream, each document followed by EOD."""
    if not docs:
        return np.zeros((0,), np.uint8)
    return np.frombuffer(b"".join(d + bytes([EOD]) for d in docs), np.uint8).copy()


def _read_utf8(path: str, limit: int) -> bytes:
    """At most `limit` bytes of a UTF-8 file (a character cut at the limit is dropped).
    Raises UnicodeDecodeError for bytes that are not UTF-8."""
    with open(path, "rb") as fh:
        data = fh.read(limit)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not (len(data) == limit and e.reason == "unexpected end of data"):
            raise
        data = data[:e.start]
    return data


def stdlib_root() -> str:
    """The running interpreter's standard library directory (always present, no download)."""
    return sysconfig.get_paths()["stdlib"]


def load_stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES,
                       val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """The default corpus: the interpreter's standard-library `.py` sources, read as bytes.

    Files are read in a fixed pseudo-random order (a hash of their relative path, so the sample is
    varied and reproducible) until `max_bytes` have been read; each file goes to validation when
    a second hash of its path falls below `val_fraction`. Test directories and files that are not
    UTF-8 are skipped.
    """
    root = stdlib_root()
    if not os.path.isdir(root):
        raise DataError(f"the standard library directory {root} is missing; pass --data FILE")
    relpaths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel = os.path.relpath(dirpath, root)
        relpaths += [os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py")]
    relpaths.sort(key=lambda p: hashlib.sha1(p.encode()).hexdigest())
    train, val, total, files = [], [], 0, 0
    for rel in relpaths:
        if total >= max_bytes:
            break
        try:
            data = _read_utf8(os.path.join(root, rel), max_bytes - total)
        except UnicodeDecodeError:
            continue  # a legacy encoding
        if not data or EOD in data:
            continue
        (val if _is_val(rel, val_fraction) else train).append(data)
        total += len(data)
        files += 1
    if not val and len(train) > 1:
        val.append(train.pop())  # a tiny --max-corpus-bytes: keep one file for validation
    desc = f"Python {sysconfig.get_python_version()} standard library ({root}), {files} files"
    return Corpus(_pack(train), _pack(val), desc)


def _expand(paths: list[str]) -> list[tuple[str, str]]:
    """Files and directories (walked recursively; hidden entries and __pycache__ skipped) ->
    [(path, key)], the key (the path relative to its directory) deciding the file's split."""
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"--data: {path!r} does not exist")
        if os.path.isdir(path):
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames
                                     if not d.startswith(".") and d != "__pycache__")
                found += [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")]
            if not found:
                raise DataError(f"--data: directory {path!r} holds no files")
            files += [(f, os.path.relpath(f, path)) for f in sorted(found)]
        else:
            files.append((path, os.path.basename(path)))
    return files


def load_text_files(paths: list[str], max_bytes: int = DEFAULT_MAX_BYTES,
                    val_fraction: float = DEFAULT_VAL_FRACTION) -> Corpus:
    """A corpus from the user's UTF-8 text files (directories are read recursively).

    Several files: split per file as the default corpus (if that leaves either side empty, the last
    file is the validation set). One file: its last `val_fraction` of bytes is the validation set.
    Raises DataError naming the file for a missing path, an empty, non-UTF-8 or binary file.
    """
    files = _expand(paths)
    docs = []
    total = 0
    for path, key in files:
        if total >= max_bytes:
            break
        if os.path.getsize(path) == 0:
            raise DataError(f"--data: {path!r} is empty")
        try:
            data = _read_utf8(path, max_bytes - total)
        except UnicodeDecodeError as e:
            raise DataError(f"--data: {path!r} is not UTF-8 text (undecodable byte "
                            f"0x{e.object[e.start]:02x} at offset {e.start}); convert it to "
                            "UTF-8") from None
        if EOD in data:
            raise DataError(f"--data: {path!r} contains NUL bytes (a binary file?); "
                            "only text files can be used")
        docs.append((key, data))
        total += len(data)
    desc = f"{len(docs)} file(s) from {', '.join(paths)}"
    if len(docs) == 1:
        data = docs[0][1]
        cut = len(data) - max(1, int(len(data) * val_fraction))
        return Corpus(_pack([data[:cut]]), _pack([data[cut:]]), desc)
    train = [d for key, d in docs if not _is_val(key, val_fraction)]
    val = [d for key, d in docs if _is_val(key, val_fraction)]
    if not train or not val:
        train, val = [d for _, d in docs[:-1]], [docs[-1][1]]
    return Corpus(_pack(train), _pack(val), desc)


class PackedBatches:
    """An endless iterator of packed fixed-length sequences from one token stream.

    Each epoch cuts the stream into non-overlapping windows of seq_len + 1 tokens (inputs and the
    next-token targets overlap by one), starting at a random offset below seq_len, and visits them
    in a random order; both come from numpy's generator seeded with (seed, epoch), so the position
    (epoch, index) alone determines every later batch: that is what a checkpoint stores.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if tokens.size < seq_len + 1:
            raise DataError(f"the token stream holds {tokens.size} tokens, fewer than one sequence "
                            f"of seq_len + 1 = {seq_len + 1}")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Window start positions of `epoch`, shuffled. [num_windows] int64."""
        rng = np.random.default_rng([self.seed, epoch])
        max_offset = min(self.seq_len - 1, self.tokens.size - 1 - self.seq_len)
        offset = int(rng.integers(0, max_offset + 1))
        num_windows = (self.tokens.size - 1 - offset) // self.seq_len
        return offset + self.seq_len * rng.permutation(num_windows)

    @property
    def windows_per_epoch(self) -> int:
        return self._order.size

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        """The next batch: [batch_size, seq_len + 1] int32."""
        starts = []
        while len(starts) < self.batch_size:
            take = self._order[self.index:self.index + self.batch_size - len(starts)]
            starts.extend(take.tolist())
            self.index += take.size
            if self.index == self._order.size:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        windows = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)
        return self.tokens[windows].astype(np.int32)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"data position: the checkpoint's seed {state['seed']} differs from "
                            f"{self.seed}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def eval_windows(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> np.ndarray:
    """A fixed validation set: the first num_batches * batch_size windows of the stream, in order
    (cycled when the stream is shorter). [num_batches, batch_size, seq_len + 1] int32."""
    if tokens.size < seq_len + 1:
        raise DataError(f"the validation text holds {tokens.size} tokens, fewer than one sequence "
                        f"of seq_len + 1 = {seq_len + 1}; add text or lower --seq-len")
    available = (tokens.size - 1) // seq_len
    count = num_batches * batch_size
    starts = seq_len * (np.arange(count) % available)
    windows = starts[:, None] + np.arange(seq_len + 1)
    return tokens[windows].astype(np.int32).reshape(num_batches, batch_size, seq_len + 1)
