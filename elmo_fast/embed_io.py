"""Corpus input and hdf5 output for `ElmoEmbedder.embed_file` and `elmo-fast embed` (spec §6.5).

Input: one whitespace-tokenized sentence per line, read as a stream of bytes and decoded line by line
(so invalid UTF-8 is reported with its line). Lines are numbered from 0 (the dataset keys of `allennlp
elmo`). Output: AllenNLP 0.9's layout — one float32 dataset per line, keyed by the line number or the
sentence, plus "sentence_to_index" — written incrementally, one flush per batch.

Note [resumable output]: while a run is in progress OUTPUT also holds the attribute `elmo_fast_job`
(the JSON of the settings that must match on resume), the dataset `_elmo_fast_done` (int64 line
numbers whose datasets are completely written; appended and flushed after each batch) and, in
stateful mode, `_elmo_fast_state_h` / `_elmo_fast_state_c` (the biLM's carried LSTM state after the
last flushed batch). A run that completes deletes all three, leaving exactly AllenNLP's layout; the
marker attribute is therefore also what tells an interrupted file from a finished one. A line
dataset that exists but is not in `_elmo_fast_done` (a batch cut off mid-write) is rewritten when
the resumed run reaches its line. HDF5 itself is not crash-proof: a SIGKILL during the few milliseconds in which a batch is
being written can damage the file; SIGINT / SIGTERM are deferred until the batch is written.
"""
import io
import json
import os
import signal
import threading
from typing import Any, BinaryIO, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import h5py
import numpy as np

__all__ = ["ConfigurationError", "InputLines", "FastaRecords", "OutputFile", "DeferInterrupts", "check_output_path",
           "JOB_ATTR", "DONE_NAME"]

JOB_ATTR = "elmo_fast_job"
DONE_NAME = "_elmo_fast_done"
STATE_NAMES = ("_elmo_fast_state_h", "_elmo_fast_state_c")
# Settings that change the file's contents; a resumed run must use the same values.
_JOB_KEYS = ("output_format", "use_sentence_keys", "forget_sentences", "state", "dtype", "shard", "input_format")
_STATEFUL_JOB_KEYS = ("batch_size", "max_tokens_per_batch")


class ConfigurationError(ValueError):
    """A problem with the input or the settings (AllenNLP raises its ConfigurationError for these)."""


# --- input ----------------------------------------------------------------------------------------

def _split_cr(raw: bytes) -> List[bytes]:
    """One binary line (from iterating a binary stream) -> the lines text-mode universal newlines sees."""
    ends_lf = raw.endswith(b"\n")
    body = raw[:-1] if ends_lf else raw
    if ends_lf and body.endswith(b"\r"):
        body = body[:-1]
    if b"\r" not in body:
        return [body]
    pieces = body.split(b"\r")
    if not ends_lf and pieces[-1] == b"":   # a final lone "\r" terminates the last line
        pieces.pop()
    return pieces


class InputLines:
    """Iterate `(index, sentence)` over a corpus: index = 0-based line number, sentence = the line
    stripped of surrounding whitespace (as `allennlp elmo`: `line.strip()`).

    source: a path, "-" (stdin), or an open file object (binary or text). Binary sources are decoded
    as UTF-8 line by line; invalid UTF-8 raises ConfigurationError naming the line unless
    encoding_errors="replace" (U+FFFD). Blank lines are an error listing every blank index (AllenNLP's
    message); the scan continues to the end of the input to list them all. `prescan()` reads a
    seekable input once up front, so that these errors come before any computation, and returns the
    number of lines; a stream (stdin) is checked as it is read.
    """

    def __init__(self, source: Any, encoding_errors: str = "strict"):
        if encoding_errors not in ("strict", "replace"):
            raise ValueError(f"encoding_errors must be 'strict' or 'replace', got {encoding_errors!r}")
        self.encoding_errors = encoding_errors
        self._owned = False
        if isinstance(source, (str, bytes, os.PathLike)):
            path = os.fsdecode(os.fspath(source))
            if path == "-":
                self.name, self.stream = "<stdin>", getattr(__import__("sys").stdin, "buffer", None)
                if self.stream is None:
                    raise ValueError("stdin has no binary buffer")
            else:
                if os.path.isdir(path):
                    raise ConfigurationError(f"input {path!r} is a directory")
                if not os.path.exists(path):
                    raise ConfigurationError(f"input file {path!r} does not exist")
                self.name, self.stream, self._owned = path, open(path, "rb"), True
        elif hasattr(source, "read"):
            self.name, self.stream = getattr(source, "name", "<input>"), source
        else:
            raise TypeError(f"input_file must be a path, '-' or a file object, got {type(source).__name__}")
        self._text = isinstance(self.stream, io.TextIOBase) or (
            not isinstance(self.stream, (io.RawIOBase, io.BufferedIOBase)) and isinstance(self.stream.read(0), str))

    def seekable(self) -> bool:
        try:
            return bool(self.stream.seekable())
        except (AttributeError, ValueError):
            return False

    def close(self) -> None:
        if self._owned:
            self.stream.close()

    def _raw(self) -> Iterator[str]:
        if self._text:
            index = 0
            try:
                for line in self.stream:
                    yield line
                    index += 1
            except UnicodeDecodeError as e:
                raise ConfigurationError(f"{self.name}: line index {index} (line {index + 1} of the file) is not "
                                         f"valid UTF-8: {e}") from None
            return
        index = 0
        for raw in self.stream:
            for piece in _split_cr(raw):
                try:
                    yield piece.decode("utf-8", self.encoding_errors)
                except UnicodeDecodeError as e:
                    raise ConfigurationError(
                        f"{self.name}: line index {index} (line {index + 1} of the file) is not valid UTF-8 "
                        f"(byte {e.start}: {piece[e.start:e.start + 4]!r}); fix the file or pass "
                        f"--encoding-errors replace (encoding_errors='replace')") from None
                index += 1

    def __iter__(self) -> Iterator[Tuple[int, str]]:
        blank: List[int] = []
        for index, line in enumerate(self._raw()):
            sentence = line.strip()
            if not sentence:
                blank.append(index)
            if blank:
                continue       # keep scanning to list every blank line, but embed nothing more
            yield index, sentence
        if blank:
            raise ConfigurationError(f"Your input file contains empty lines at indexes {blank}. "
                                     f"Please remove them.")

    def prescan(self) -> Optional[int]:
        """Check a seekable input completely (UTF-8, blank lines) and return its line count; None for a stream."""
        if not self.seekable():
            return None
        start = self.stream.tell()
        count = 0
        for count, _ in enumerate(self, 1):
            pass
        self.stream.seek(start)
        return count


class FastaRecords:
    """Iterate `(index, (id, sequence))` over a FASTA file: index = 0-based record number, id = the first
    word of the header line after ">", sequence = the record's sequence lines joined with all whitespace
    removed (multi-line records; residues are kept as written, case included).

    Note [FASTA input]: each record is embedded as one sentence of one-residue tokens (SeqVec), keyed by
    its id. Blank lines are skipped (as Biopython's parser does). Errors (ConfigurationError, naming the
    line): sequence data before the first header, a header without an id, invalid UTF-8 (unless
    encoding_errors="replace"), and ids that occur more than once (`prescan()` lists every duplicate id
    before any computation; a stream stops at the first). A record without residues is an empty
    sentence (Note [empty sentence] in elmo_fast.embedder).
    """

    def __init__(self, source: Any, encoding_errors: str = "strict"):
        self._lines = InputLines(source, encoding_errors)
        self.name = self._lines.name

    def seekable(self) -> bool:
        return self._lines.seekable()

    def close(self) -> None:
        self._lines.close()

    def _records(self) -> Iterator[Tuple[int, str, str]]:
        """(line number of the header, id, sequence) per record, no duplicate check."""
        header_line, name, parts = -1, None, []  # type: int, Optional[str], List[str]
        for index, line in enumerate(self._lines._raw()):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if name is not None:
                    yield header_line, name, "".join(parts)
                words = line[1:].split()
                if not words:
                    raise ConfigurationError(f"{self.name}: line {index + 1}: a FASTA header without an id")
                header_line, name, parts = index, words[0], []
            elif name is None:
                raise ConfigurationError(f"{self.name}: line {index + 1}: sequence data before the first '>' header "
                                         f"(is this a FASTA file? plain text needs no --fasta)")
            else:
                parts.append("".join(line.split()))
        if name is not None:
            yield header_line, name, "".join(parts)

    def __iter__(self) -> Iterator[Tuple[int, Tuple[str, str]]]:
        seen: Dict[str, int] = {}
        for index, (line, name, sequence) in enumerate(self._records()):
            if name in seen:
                raise ConfigurationError(f"{self.name}: duplicate FASTA id {name!r} (lines {seen[name] + 1} and "
                                         f"{line + 1}); the ids are the dataset keys and must be unique")
            seen[name] = line
            yield index, (name, sequence)

    def prescan(self) -> Optional[int]:
        """Check a seekable input completely (format, UTF-8, duplicate ids: all listed) and return the
        number of records; None for a stream."""
        if not self.seekable():
            return None
        stream = self._lines.stream
        start = stream.tell()
        seen: Dict[str, int] = {}
        duplicates: Dict[str, List[int]] = {}
        count = 0
        for count, (line, name, _) in enumerate(self._records(), 1):
            if name in seen:
                duplicates.setdefault(name, [seen[name] + 1]).append(line + 1)
            else:
                seen[name] = line
        if duplicates:
            shown = "; ".join(f"{name!r} (header lines {', '.join(map(str, lines))})"
                              for name, lines in list(duplicates.items())[:20])
            more = f"; and {len(duplicates) - 20} more" if len(duplicates) > 20 else ""
            raise ConfigurationError(f"{self.name}: {len(duplicates)} FASTA id(s) occur more than once: {shown}{more}. "
                                     f"The ids are the dataset keys and must be unique.")
        stream.seek(start)
        return count


# --- output ---------------------------------------------------------------------------------------

def check_output_path(path: str, *, overwrite: bool, resume: bool) -> str:
    """Fail early (before a model is loaded) on an output path that cannot be written or must not be
    replaced. Returns "new" (create), "overwrite" (replace) or "resume" (continue an existing file)."""
    path = os.fsdecode(os.fspath(path))
    if os.path.isdir(path):
        raise ConfigurationError(f"output {path!r} is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"cannot write output {path!r}: directory {parent!r} does not exist")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise ConfigurationError(f"cannot write output {path!r}: permission denied")
        if resume:
            return "resume"
        if overwrite:
            return "overwrite"
        raise ConfigurationError(f"output {path!r} already exists; pass --overwrite to replace it or --resume to "
                                 f"complete an interrupted run")
    if not os.access(parent, os.W_OK):
        raise ConfigurationError(f"cannot write output {path!r}: directory {parent!r} is not writable")
    return "new"


class OutputFile:
    """An `allennlp elmo` hdf5 file being written, resumably (Note [resumable output]).

    mode: "new" | "overwrite" | "resume" (from check_output_path). job: the settings (JSON-able dict)
    stored while in progress and compared on resume. After opening, `complete` tells whether a resumed
    file was already finished, `done` is a bool array over line indices already written (grown as
    needed) and `state` the saved (h, c) numpy arrays or None.
    """

    def __init__(self, path: str, mode: str, job: Dict[str, Any]):
        self.path = os.fsdecode(os.fspath(path))
        self.job = job
        self.complete = False
        self.state: Optional[Tuple[np.ndarray, np.ndarray]] = None
        self.done = np.zeros(0, dtype=bool)
        self.n_done = 0
        if mode == "resume":
            try:
                self.h5 = h5py.File(self.path, "r+")
            except OSError as e:
                raise ConfigurationError(f"cannot resume {self.path!r}: not a readable hdf5 file ({e}); "
                                         f"pass --overwrite to start again") from None
            self._open_existing()
        else:
            try:
                self.h5 = h5py.File(self.path, "w" if mode == "overwrite" else "w-")
            except OSError as e:
                raise ConfigurationError(f"cannot create output {self.path!r}: {e}") from None
            self.h5.attrs[JOB_ATTR] = json.dumps(job, sort_keys=True)
            self.h5.create_dataset(DONE_NAME, shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,))
            self.h5.flush()

    def _open_existing(self) -> None:
        if JOB_ATTR not in self.h5.attrs:
            self.complete = True      # a finished file (or one this tool did not write): leave it alone
            return
        stored = json.loads(self.h5.attrs[JOB_ATTR])
        keys = _JOB_KEYS + (_STATEFUL_JOB_KEYS if self.job.get("state") == "carry" else ())
        diff = [f"{k}: file has {stored.get(k)!r}, this run {self.job.get(k)!r}" for k in keys
                if stored.get(k) != self.job.get(k)]
        if diff:
            raise ConfigurationError(f"cannot resume {self.path!r} with different settings: " + "; ".join(diff))
        lines = self.h5[DONE_NAME][()] if DONE_NAME in self.h5 else np.zeros(0, np.int64)
        self._grow(int(lines.max()) + 1 if lines.size else 0)
        self.done[lines] = True
        self.n_done = int(self.done.sum())
        if all(name in self.h5 for name in STATE_NAMES):
            self.state = tuple(self.h5[name][()] for name in STATE_NAMES)  # type: ignore[assignment]

    def _grow(self, size: int) -> None:
        if size > self.done.size:
            grown = np.zeros(max(size, 2 * self.done.size), dtype=bool)
            grown[:self.done.size] = self.done
            self.done = grown

    def is_done(self, index: int) -> bool:
        return index < self.done.size and bool(self.done[index])

    def write_batch(self, items: Sequence[Tuple[int, str, np.ndarray]],
                    state: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> None:
        """Write `(line index, key, float32 array)` items, then record them as done (and the state), then flush."""
        h5 = self.h5
        for _, key, array in items:
            if key in h5:
                # Leftover of a batch cut off mid-write, or a duplicate sentence key (found earlier by the reader).
                del h5[key]
            h5.create_dataset(key, array.shape, dtype="float32", data=array)
        if state is not None:
            for name, value in zip(STATE_NAMES, state):
                if name in h5 and h5[name].shape == value.shape and h5[name].dtype == value.dtype:
                    h5[name][...] = value
                else:
                    if name in h5:
                        del h5[name]
                    h5.create_dataset(name, data=value)
        done = h5[DONE_NAME]
        start = done.shape[0]
        done.resize((start + len(items),))
        indices = np.fromiter((i for i, _, _ in items), dtype=np.int64, count=len(items))
        done[start:] = indices
        if indices.size:
            self._grow(int(indices.max()) + 1)
            self.done[indices] = True
        self.n_done += len(items)
        h5.flush()

    def finalize(self, sentence_to_index: Optional[Dict[str, str]]) -> None:
        """Write "sentence_to_index" (when given) and remove the progress records: AllenNLP's exact layout."""
        h5 = self.h5
        if sentence_to_index is not None:
            if "sentence_to_index" in h5:
                del h5["sentence_to_index"]
            dataset = h5.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))
            dataset[0] = json.dumps(sentence_to_index)
        for name in (DONE_NAME,) + STATE_NAMES:
            if name in h5:
                del h5[name]
        if JOB_ATTR in h5.attrs:
            del h5.attrs[JOB_ATTR]
        h5.flush()
        self.complete = True

    def close(self) -> None:
        if getattr(self, "h5", None) is not None and self.h5.id.valid:
            self.h5.close()


class DeferInterrupts:
    """Hold SIGINT / SIGTERM while a batch is written, then raise KeyboardInterrupt: the file stays valid.

    A no-op outside the main thread. SIGTERM is turned into KeyboardInterrupt while installed, so a
    `kill` gets the same clean stop as Ctrl-C.
    """

    def __init__(self):
        self._pending: Optional[int] = None
        self._deferring = False
        self._old: Dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self._deferring:
            self._pending = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    def install(self) -> "DeferInterrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __enter__(self):
        self._deferring = True
        return self

    def __exit__(self, *exc):
        self._deferring = False
        if self._pending is not None and exc[0] is None:
            signum, self._pending = self._pending, None
            raise KeyboardInterrupt(f"signal {signum}")
        return False
