"""Corpus embedding: stream lines, batch them, embed, write `allennlp elmo`'s hdf5 (spec §6.5), resumably.

Used by `ElmoEmbedder.embed_file` and `elmo-fast embed`. Two batching schemes:
  in order (state "carry", or sort=False): `batch_size` consecutive lines per batch, closed early when a
      token budget is given and the next line would exceed it. This is AllenNLP's batching when no budget
      is given, so stateful output matches AllenNLP's.
  sorted (states "zero" / "warm", the default there): lines are read into a window of `window` lines,
      sorted by length and packed into batches of at most `batch_size` rows and `max_tokens_per_batch`
      padded tokens (rows x (longest + 2)); a last, unfilled batch is carried into the next window. The
      state does not depend on the batch, so the output equals unsorted embedding up to float rounding
      (~1e-6 in float32: CPU GEMMs round differently for different batch sizes; not bitwise).
Resume (Note [resumable output] in embed_io): lines recorded as done are skipped. With state "carry" the
done lines are a prefix and the carried LSTM state is saved after every batch, so a resumed run continues
with exactly the state the interrupted one had: the completed file equals an uninterrupted run's.
FASTA input (input_format="fasta", Note [FASTA input] in embed_io): records instead of lines, one residue per
token, keys = the ids, no "sentence_to_index"; everything else (budget, sorting, resume, shards) is the same.
"""
import os
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from elmo_fast.embed_io import (ConfigurationError, DeferInterrupts, FastaRecords, InputLines, OutputFile,
                                check_output_path)

__all__ = ["prepare", "run", "embed_corpus", "merge_shards", "FORMATS"]

FORMATS = ("all", "top", "average")
INPUT_FORMATS = ("text", "fasta")

Item = Tuple[int, str, List[str]]      # (line index, dataset key, tokens)


def _check_settings(output_format: str, batch_size: Any, max_tokens_per_batch: Any) -> None:
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens_per_batch is not None and (not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1):
        raise ValueError(f"max_tokens_per_batch must be a positive integer or None, got {max_tokens_per_batch!r}")


def _cost(rows: int, longest: int) -> int:
    return rows * (longest + 2)


def _in_order(items: Iterable[Item], batch_size: int, max_tokens: Optional[int]) -> Iterator[List[Item]]:
    batch: List[Item] = []
    longest = 0
    for item in items:
        n = len(item[2])
        if batch and (len(batch) == batch_size or (max_tokens and _cost(len(batch) + 1, max(longest, n)) > max_tokens)):
            yield batch
            batch, longest = [], 0
        batch.append(item)
        longest = max(longest, n)
    if batch:
        yield batch


def _sorted(items: Iterable[Item], batch_size: int, max_tokens: Optional[int], window: int) -> Iterator[List[Item]]:
    pending: List[Item] = []

    def pack(final: bool) -> Iterator[List[Item]]:
        nonlocal pending
        batches = list(_in_order(sorted(pending, key=lambda it: (len(it[2]), it[0])), batch_size, max_tokens))
        pending = []
        if batches and not final:
            last = batches[-1]
            longest = len(last[-1][2])
            if len(last) < batch_size and not (max_tokens and _cost(len(last) + 1, longest) > max_tokens):
                pending = batches.pop()          # not full: wait for more lines of its length
        yield from batches

    for item in items:
        pending.append(item)
        if len(pending) >= window:
            yield from pack(final=False)
    yield from pack(final=True)


def _format(array: Optional[np.ndarray], length: int, output_format: str) -> np.ndarray:
    """array: (L + 1, T, D) of one row -> the dataset contents, as AllenNLP's embed_file computes them.
    An empty sentence (FASTA only) gets AllenNLP's empty embedding (Note [empty sentence])."""
    if length == 0:
        from elmo_fast.embedder import empty_embedding

        array = empty_embedding()
    embeddings = array[:, :length]
    if output_format == "top":
        return embeddings[-1]
    if output_format == "average":   # (np.average divides by zero on the empty embedding)
        return np.average(embeddings, axis=0) if length else embeddings[-1]
    return embeddings


def prepare(input_file: Any, output_file_path: str, *, output_format: str = "all", batch_size: int = 64,
            forget_sentences: bool = False, use_sentence_keys: bool = False,
            max_tokens_per_batch: Optional[int] = None, resume: bool = False, overwrite: bool = False,
            encoding_errors: str = "strict", state: str = "carry", dtype: str = "float32",
            shard: Tuple[int, int] = (0, 1), input_format: str = "text") -> Dict[str, Any]:
    """Everything that can fail before a model is loaded: settings, the output path (opened/created),
    and the input (a seekable file is read once to check UTF-8 and blank lines (FASTA: the format and
    duplicate ids) and count lines (records))."""
    _check_settings(output_format, batch_size, max_tokens_per_batch)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format must be one of {INPUT_FORMATS}, got {input_format!r}")
    if input_format == "fasta" and use_sentence_keys:
        raise ValueError("FASTA input is keyed by the sequence ids; use_sentence_keys (--use-sentence-keys) does not "
                         "apply")
    output_file_path = os.fsdecode(os.fspath(output_file_path))
    mode = check_output_path(output_file_path, overwrite=overwrite, resume=resume)
    reader = FastaRecords(input_file, encoding_errors) if input_format == "fasta" else InputLines(input_file,
                                                                                                  encoding_errors)
    try:
        count = reader.prescan()
        job = {"output_format": output_format, "use_sentence_keys": use_sentence_keys,
               "forget_sentences": forget_sentences, "state": state, "dtype": dtype, "batch_size": batch_size,
               "max_tokens_per_batch": max_tokens_per_batch, "shard": list(shard)}
        if input_format == "fasta":   # absent for text, so that files begun before FASTA support still resume
            job["input_format"] = input_format
        output = OutputFile(output_file_path, mode, job)
    except BaseException:
        reader.close()
        raise
    return {"reader": reader, "count": count, "output": output, "job": job, "created": mode != "resume"}


def run(embedder: Any, prepared: Dict[str, Any], *, sort: Optional[bool] = None, window: Optional[int] = None,
        progress: bool = False, finalize: bool = True, defer_signals: bool = False) -> Dict[str, Any]:
    """Embed the prepared corpus with `embedder` (an ElmoEmbedder) into the prepared output."""
    reader: InputLines = prepared["reader"]
    output: OutputFile = prepared["output"]
    job = prepared["job"]
    output_format, batch_size, max_tokens = job["output_format"], job["batch_size"], job["max_tokens_per_batch"]
    rank, world = job["shard"]
    use_sentence_keys, forget_sentences = job["use_sentence_keys"], job["forget_sentences"]
    fasta = job.get("input_format") == "fasta"
    state = embedder.state
    if state != job["state"]:
        raise ValueError(f"the embedder's state {state!r} differs from the prepared job's {job['state']!r}")
    if sort is None:
        sort = state != "carry"
    if sort and state == "carry":
        raise ValueError("sorted batching needs an order-independent state ('zero' or 'warm'), not 'carry'")
    if world > 1 and state == "carry":
        raise ValueError("sharding needs an order-independent state ('zero' or 'warm'): the carried state "
                         "depends on every earlier batch")
    window = window or max(1000, 100 * batch_size)
    summary = {"lines": 0, "embedded": 0, "tokens": 0, "skipped": output.n_done, "seconds": 0.0,
               "complete_before": output.complete}
    track_index = not forget_sentences and not use_sentence_keys and not fasta
    sentence_to_index: Optional[Dict[str, str]] = {} if track_index else None
    if output.complete:
        reader.close()
        output.close()
        return summary
    if state == "carry":
        n = output.n_done
        if not output.done[:n].all():
            raise ConfigurationError(f"{output.path}: the recorded progress is not a prefix of the input; it cannot be "
                                     f"resumed in stateful mode")
        if n or prepared["created"] is False:
            embedder.set_state(output.state)
        else:
            initial = embedder.get_state()   # AllenNLP does not reset: keep it, so a resume starts from it too
            if initial is not None:
                output.write_batch([], initial)

    seen_keys = set() if use_sentence_keys else None
    counters = {"tokens": 0, "lines": 0}

    def items() -> Iterator[Item]:
        for index, sentence in reader:
            counters["lines"] += 1
            if fasta:      # (id, sequence): the id is the key, each residue a token
                key, residues = sentence
                if index % world == rank and not output.is_done(index):
                    yield index, key, list(residues)
                continue
            key = sentence if use_sentence_keys else str(index)
            if seen_keys is not None:
                if key in seen_keys:
                    raise ConfigurationError(f"Key already exists in {output.path}. To encode duplicate sentences, "
                                             f"do not pass the --use-sentence-keys flag. (line index {index})")
                seen_keys.add(key)
            if sentence_to_index is not None:
                sentence_to_index[sentence] = key
            if index % world != rank or output.is_done(index):
                continue
            yield index, key, sentence.split()

    batches = (_sorted(items(), batch_size, max_tokens, window) if sort
               else _in_order(items(), batch_size, max_tokens))
    bar = None
    if progress:
        from tqdm import tqdm

        total = prepared["count"]
        if total is not None and world > 1:
            total = len(range(rank, total, world))
        bar = tqdm(total=total, initial=output.n_done, unit="sent", dynamic_ncols=True, smoothing=0.1,
                   desc=os.path.basename(output.path))
    deferrer = DeferInterrupts().install() if defer_signals else None
    start = time.perf_counter()
    try:
        for batch in batches:
            sentences = [tokens for _, _, tokens in batch]
            # a batch of only empty sequences does not run the model (embed_batch's [[]])
            arrays = embedder._numpy_batch(sentences) if any(sentences) else [None] * len(batch)
            records = [(index, key, _format(arrays[row], len(tokens), output_format).astype(np.float32, copy=False))
                       for row, (index, key, tokens) in enumerate(batch)]
            ntok = sum(len(tokens) for _, _, tokens in batch)
            if deferrer is not None:
                with deferrer:
                    output.write_batch(records, embedder.get_state())
            else:
                output.write_batch(records, embedder.get_state())
            summary["embedded"] += len(batch)
            summary["tokens"] += ntok
            if bar is not None:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{summary['tokens'] / elapsed:,.0f} tok/s", refresh=False)
                bar.update(len(batch))
        summary["lines"] = counters["lines"]
        if finalize:   # a shard gets no "sentence_to_index": the merge writes one for the whole corpus
            output.finalize(sentence_to_index if world == 1 else None)
        else:
            output.h5.flush()
    finally:
        summary["seconds"] = time.perf_counter() - start
        if bar is not None:
            bar.close()
        if deferrer is not None:
            deferrer.uninstall()
        reader.close()
        output.close()
    summary["sentence_to_index"] = sentence_to_index
    return summary


def embed_corpus(embedder: Any, input_file: Any, output_file_path: str, *, output_format: str = "all",
                 batch_size: int = 64, forget_sentences: bool = False, use_sentence_keys: bool = False,
                 max_tokens_per_batch: Optional[int] = None, resume: bool = False, overwrite: bool = False,
                 encoding_errors: str = "strict", sort: Optional[bool] = None, window: Optional[int] = None,
                 progress: bool = False, input_format: str = "text") -> Dict[str, Any]:
    """prepare + run with a loaded embedder (ElmoEmbedder.embed_file)."""
    from elmo_fast.embedder import dtype_name

    prepared = prepare(input_file, output_file_path, output_format=output_format, batch_size=batch_size,
                       forget_sentences=forget_sentences, use_sentence_keys=use_sentence_keys,
                       max_tokens_per_batch=max_tokens_per_batch, resume=resume, overwrite=overwrite,
                       encoding_errors=encoding_errors, state=embedder.state, dtype=dtype_name(embedder.dtype),
                       input_format=input_format)
    summary = run(embedder, prepared, sort=sort, window=window, progress=progress)
    summary.pop("sentence_to_index", None)
    return summary


def merge_shards(shard_paths: List[str], output_file_path: str,
                 sentence_to_index: Optional[Dict[str, str]]) -> None:
    """Copy the line datasets of finished shards into one `allennlp elmo` file (+ "sentence_to_index")."""
    import json

    import h5py

    with h5py.File(output_file_path, "w") as out:
        for path in shard_paths:
            with h5py.File(path, "r") as shard:
                for key in shard.keys():
                    shard.copy(shard[key], out, name=key)
        if sentence_to_index is not None:
            dataset = out.create_dataset("sentence_to_index", (1,), dtype=h5py.special_dtype(vlen=str))
            dataset[0] = json.dumps(sentence_to_index)
