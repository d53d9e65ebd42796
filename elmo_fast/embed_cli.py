"""`elmo-fast embed`: embed a corpus into `allennlp elmo`'s hdf5 layout (spec §6.5), in one process or,
under torchrun, sharded across processes (gloo on CPU, NCCL on GPUs).

Sharding (world size > 1, states "zero" / "warm" only): line i goes to rank i % world_size; rank r writes
`<OUTPUT without extension>.rank<r><extension>` (a finished `allennlp elmo` file of its lines, without
"sentence_to_index"); after a barrier rank 0 merges the shards into OUTPUT (written beside it, then renamed,
so OUTPUT is never half-merged) and deletes them. `--no-merge` keeps the shards and writes
`<OUTPUT without extension>.index.json` instead: {"format", "world_size", "assignment", "shards", "lines",
"output_format", "sentence_to_index"}. `--resume` resumes every shard.
"""
import argparse
import datetime
import json
import os
import sys
from typing import Any, Dict, List, Optional

__all__ = ["add_embed_parser", "shard_path"]


def add_embed_parser(sub: Any) -> None:
    from elmo_fast.cli import positive_int

    p = sub.add_parser("embed", help="embed a corpus (one tokenized sentence per line) into an hdf5 file",
                       description="Embed a text file (one whitespace-tokenized sentence per line) with ELMo into an "
                                   "hdf5 file in the layout of AllenNLP 0.9's `allennlp elmo`.")
    p.add_argument("input", metavar="INPUT", help="input text file (FASTA with --fasta), or - for stdin")
    p.add_argument("output", metavar="OUTPUT", help="output hdf5 file")
    p.add_argument("--options-file", required=True, help="ELMo options.json")
    p.add_argument("--weight-file", required=True, help="ELMo weights hdf5")
    fmt = p.add_mutually_exclusive_group(required=True)
    fmt.add_argument("--all", dest="output_format", action="store_const", const="all",
                     help="all layers: (L+1, len, 2P) per sentence")
    fmt.add_argument("--top", dest="output_format", action="store_const", const="top", help="top layer: (len, 2P)")
    fmt.add_argument("--average", dest="output_format", action="store_const", const="average",
                     help="mean of the layers: (len, 2P)")
    p.add_argument("--fasta", action="store_true",
                   help="INPUT is FASTA: each sequence is a sentence of one-residue tokens (SeqVec), keyed by its id")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--max-tokens-per-batch", type=int, default=None,
                   help="cap on padded tokens (residues with --fasta) per batch, rows x (longest + 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    state = p.add_mutually_exclusive_group()
    state.add_argument("--stateless", action="store_true",
                       help="every sentence starts from the zero state: order-independent; enables length-sorted "
                            "batching and torchrun sharding (default: AllenNLP's carried state, file order)")
    state.add_argument("--warm-state", action="store_true",
                       help="every sentence starts from one fixed warmed-up state: order-independent")
    p.add_argument("--sort-window", type=int, default=None,
                   help="lines read ahead and sorted by length in order-independent modes (default 100 x batch size)")
    p.add_argument("--forget-sentences", action="store_true", help="do not write sentence_to_index")
    p.add_argument("--use-sentence-keys", action="store_true", help="key datasets by sentence instead of line number")
    p.add_argument("--resume", action="store_true", help="complete an interrupted run's OUTPUT")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    p.add_argument("--encoding-errors", choices=["strict", "replace"], default="strict",
                   help="invalid UTF-8: stop with an error naming the line (strict) or use U+FFFD (replace)")
    p.add_argument("--no-merge", action="store_true", help="under torchrun: keep the shards, write an index JSON")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=embed_main)


def shard_path(output: str, rank: int) -> str:
    root, ext = os.path.splitext(output)
    return f"{root}.rank{rank}{ext or '.hdf5'}"


def _state(args: argparse.Namespace) -> str:
    return "zero" if args.stateless else "warm" if args.warm_state else "carry"


def _error(message: str, rank: Optional[int] = None) -> int:
    prefix = "elmo-fast embed" + (f" [rank {rank}]" if rank is not None else "")
    print(f"{prefix}: error: {message}", file=sys.stderr)
    return 2


def _load(args: argparse.Namespace, device: Optional[str] = None):
    from elmo_fast.embedder import ElmoEmbedder

    return ElmoEmbedder(args.options_file, args.weight_file, device=device or args.device, dtype=args.dtype,
                        state=_state(args))


def _report(summary: Dict[str, Any]) -> None:
    seconds = max(summary["seconds"], 1e-9)
    print(f"embedded {summary['embedded']} sentences ({summary['tokens']} tokens) in {seconds:.1f} s: "
          f"{summary['embedded'] / seconds:.1f} sentences/s, {summary['tokens'] / seconds:.0f} tokens/s"
          + (f"; {summary['skipped']} lines already done" if summary["skipped"] else ""), file=sys.stderr)


def _prepare(args: argparse.Namespace, output: str, shard=(0, 1)):
    from elmo_fast import corpus

    return corpus.prepare(args.input, output, output_format=args.output_format, batch_size=args.batch_size,
                          forget_sentences=args.forget_sentences, use_sentence_keys=args.use_sentence_keys,
                          max_tokens_per_batch=args.max_tokens_per_batch, resume=args.resume,
                          overwrite=args.overwrite, encoding_errors=args.encoding_errors, state=_state(args),
                          dtype=args.dtype, shard=shard, input_format="fasta" if args.fasta else "text")


def embed_main(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _embed_distributed(args)
    from elmo_fast import corpus
    from elmo_fast.embed_io import ConfigurationError

    try:
        prepared = _prepare(args, args.output)
    except (ConfigurationError, ValueError, TypeError) as e:
        return _error(str(e))
    if prepared["output"].complete:
        prepared["output"].close()
        prepared["reader"].close()
        print(f"{args.output} is already complete; nothing to do", file=sys.stderr)
        return 0
    try:
        embedder = _load(args)
    except BaseException as e:
        prepared["output"].close()
        prepared["reader"].close()
        if prepared["created"]:
            os.remove(args.output)
        if isinstance(e, (ValueError, OSError, KeyError)):
            return _error(str(e))
        raise
    try:
        summary = corpus.run(embedder, prepared, window=args.sort_window, progress=not args.no_progress,
                             defer_signals=True)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {args.output} is a valid hdf5 file holding the batches written so far; run the same "
              f"command with --resume to complete it", file=sys.stderr)
        return 130
    except (ConfigurationError, ValueError) as e:
        return _error(str(e))
    _report(summary)
    return 0


def _embed_distributed(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from elmo_fast import corpus
    from elmo_fast.embed_io import JOB_ATTR, ConfigurationError, check_output_path

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if _state(args) == "carry":
        return _error("more than one process needs --stateless or --warm-state: AllenNLP's carried state depends on "
                      "the order of every earlier batch, so it cannot be split across processes", rank)
    if args.input == "-":
        return _error("stdin input cannot be split across processes; give a file", rank)
    device = args.device
    if device.startswith("cuda"):
        if device == "cuda":
            device = f"cuda:{local_rank}"
        torch.cuda.set_device(torch.device(device))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=72))
    flag_device = torch.device(device) if backend == "nccl" else torch.device("cpu")

    def all_ok(ok: bool) -> bool:
        flag = torch.tensor([1 if ok else 0], device=flag_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    try:
        mine = shard_path(args.output, rank)
        shards = [shard_path(args.output, r) for r in range(world)]
        prepared, error = None, None
        try:
            mode = check_output_path(args.output, overwrite=args.overwrite, resume=args.resume) \
                if not args.no_merge else "new"
            finished = False
            if mode == "resume":
                import h5py

                with h5py.File(args.output, "r") as f:
                    finished = JOB_ATTR not in f.attrs
            if not finished:
                prepared = _prepare(args, mine, shard=(rank, world))
        except (ConfigurationError, ValueError, TypeError, OSError) as e:
            error = str(e)
        if not all_ok(error is None):
            return _error(error, rank) if error else 2
        if prepared is None:
            if rank == 0:
                print(f"{args.output} is already complete; nothing to do", file=sys.stderr)
            return 0
        summary, error = None, None
        try:
            if not prepared["output"].complete:
                embedder = _load(args, device)
                summary = corpus.run(embedder, prepared, window=args.sort_window,
                                     progress=rank == 0 and not args.no_progress)
            else:
                prepared["output"].close()
                summary = _index_only(prepared)
        except (ConfigurationError, ValueError, OSError) as e:
            error = str(e)
        if not all_ok(error is None):
            return _error(error, rank) if error else 2
        if rank == 0:
            _report(summary)
            _finish(args, shards, summary, world)
        dist.barrier()
        return 0
    except KeyboardInterrupt:
        print(f"\n[rank {rank}] interrupted: the shards are valid; rerun with --resume", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _index_only(prepared: Dict[str, Any]) -> Dict[str, Any]:
    """A finished shard on resume: read the input once more for sentence_to_index and the line count."""
    job = prepared["job"]
    track = not job["forget_sentences"] and not job["use_sentence_keys"]
    sentence_to_index: Optional[Dict[str, str]] = {} if track else None
    lines = 0
    for index, sentence in prepared["reader"]:
        lines += 1
        if sentence_to_index is not None:
            sentence_to_index[sentence] = str(index)
    prepared["reader"].close()
    return {"lines": lines, "embedded": 0, "tokens": 0, "skipped": 0, "seconds": 0.0,
            "sentence_to_index": sentence_to_index}


def _finish(args: argparse.Namespace, shards: List[str], summary: Dict[str, Any], world: int) -> None:
    from elmo_fast import corpus

    if args.no_merge:
        root = os.path.splitext(args.output)[0]
        index = {"format": "elmo_fast shards 1", "world_size": world,
                 "assignment": "round-robin: line i is in shard i % world_size", "shards": shards,
                 "lines": summary["lines"], "output_format": args.output_format,
                 "sentence_to_index": summary.get("sentence_to_index")}
        with open(f"{root}.index.json", "w", encoding="utf-8") as f:
            json.dump(index, f)
        return
    partial = args.output + ".merging"
    corpus.merge_shards(shards, partial, summary.get("sentence_to_index"))
    os.replace(partial, args.output)
    for path in shards:
        os.remove(path)
