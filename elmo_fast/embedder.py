"""`ElmoEmbedder`: AllenNLP 0.9's `allennlp.commands.elmo.ElmoEmbedder` (spec §6.5) on elmo_fast's biLM.

Shape letters: B sentences, L + 1 layers (3 for every published model), T tokens, D = 2P output width.

Note [embedder state]: `state` picks where each batch row's LSTM state comes from.
  "carry" (default; `stateful=True`): AllenNLP's behaviour (spec §5.5) — the state each row index left
      in the previous batch, zeros for the first batch. Results depend on batch order and composition,
      so corpus embedding keeps the file order and fixed batches (`batch_size` consecutive lines).
  "zero" (`stateful=False`): every row starts from zeros. Order-independent, so `embed_file` may sort
      lines into length buckets and shard the corpus across processes.
  "warm": every row starts from one fixed state, computed once at load by running WARM_UP_TEXT (one
      sentence after another in a single row, from zeros). Order-independent like "zero", but the
      vectors start from a state like the one AllenNLP's rows reach after a few batches (no cold start).
Note [empty sentence]: as AllenNLP 0.9, an empty sentence gives `numpy.zeros((3, 0, 1024))` (float64,
  the shape hard-coded for the original model) whatever the model's size; the batch `[[]]` does not run
  the model (so the carried state is untouched), an empty sentence inside a larger batch does.
"""
import contextlib
import logging
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import ElmoBiLm, remove_sentence_boundaries

__all__ = ["ElmoEmbedder", "DEFAULT_BATCH_SIZE", "WARM_UP_TEXT", "empty_embedding"]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}
STATES = ("carry", "zero", "warm")

# Fixed warm-up text for state="warm" (Note [embedder state]): ordinary English sentences of typical
# lengths. Changing it changes every "warm" vector, so it is part of the format.
WARM_UP_TEXT = (
    "The committee met on Tuesday to discuss the new budget .",
    "She said that the results were better than expected , but more work is needed .",
    "In 1998 , the company moved its headquarters from Boston to New York .",
    "It was a cold morning and the streets were empty .",
    "Researchers have found that people who sleep more tend to live longer .",
    "He did n't know what to say , so he smiled and walked away .",
    "The river runs through the center of the old town .",
    "Prices rose by 3 percent last year , according to official figures .",
)


def empty_embedding() -> np.ndarray:
    """AllenNLP 0.9's embedding of an empty sentence (Note [empty sentence])."""
    return np.zeros((3, 0, 1024))


def _resolve_device(cuda_device: int, device: Any) -> torch.device:
    if device is None:
        dev = torch.device("cpu") if cuda_device is None or cuda_device < 0 else torch.device("cuda", cuda_device)
    else:
        dev = torch.device(device)
        if cuda_device is not None and cuda_device >= 0 and dev != torch.device("cuda", cuda_device):
            raise ValueError(f"cuda_device={cuda_device} and device={device!r} disagree; pass one of them")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(dev)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(dev)!r} requested but CUDA is not available")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} does not exist ({torch.cuda.device_count()} CUDA devices)")
        dev = torch.device("cuda", index)
    return dev


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or the torch dtype), got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ElmoEmbedder:
    """Embed tokenized sentences with the biLM's L + 1 layers (AllenNLP 0.9's `ElmoEmbedder`).

    options_file, weight_file: bilm-tf files (paths). cuda_device: -1 = CPU, N >= 0 = cuda:N (AllenNLP's
    argument); `device` ("cpu", "cuda", "cuda:N" or torch.device) is the same choice by name.
    dtype: float32 (default), float64, or float16 / bfloat16 where the build supports them on that
    device (checked at load with a one-sentence probe: a clear ValueError otherwise).
    stateful / state: Note [embedder state]; `state` ("carry" | "zero" | "warm") overrides `stateful`.
    warm_up: sentences (lists of tokens) replacing WARM_UP_TEXT for state="warm".
    Outputs are numpy float32 (float64 for a float64 model); fp16/bf16 results are returned as float32.
    """

    def __init__(self, options_file, weight_file, cuda_device: int = -1, *, device: Any = None, dtype: Any = None,
                 stateful: bool = True, state: Optional[str] = None,
                 warm_up: Optional[Sequence[Sequence[str]]] = None):
        if state is None:
            state = "carry" if stateful else "zero"
        if state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {state!r}")
        if state == "carry" and not stateful:
            raise ValueError("state='carry' contradicts stateful=False")
        self.state = state
        self.device = _resolve_device(cuda_device, device)
        self.dtype = _resolve_dtype(dtype)
        self.cuda_device = self.device.index if self.device.type == "cuda" else -1
        bilm = ElmoBiLm(options_file, weight_file, stateful=state != "zero")
        bilm.eval()
        self.elmo_bilm = bilm.to(device=self.device, dtype=self.dtype)
        self._warm: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._probe()
        if state == "warm":
            self._warm = self._warm_up(warm_up if warm_up is not None else [s.split() for s in WARM_UP_TEXT])

    @property
    def output_dim(self) -> int:
        return self.elmo_bilm.get_output_dim()

    @property
    def num_layers(self) -> int:
        return self.elmo_bilm.num_layers

    def _probe(self) -> None:
        try:
            with torch.no_grad():
                self.elmo_bilm(batch_to_ids([["probe"]]).to(self.device))
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
            raise ValueError(f"dtype {dtype_name(self.dtype)} is not supported on {self.device} by this build of "
                             f"elmo_fast ({type(e).__name__}: {e}); use --dtype float32") from None
        finally:
            self.reset_states()

    @torch.no_grad()
    def _warm_up(self, sentences: Sequence[Sequence[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        lstm = self.elmo_bilm._elmo_lstm
        lstm.reset_states()
        for sentence in sentences:
            self.elmo_bilm(batch_to_ids([list(sentence)]).to(self.device))
        if lstm._states is None:
            raise ValueError("warm_up must hold at least one sentence")
        h, c = (s[:, :1].clone() for s in lstm._states)   # (L, 1, 2P), (L, 1, 2n)
        lstm.reset_states()
        return h, c

    def reset_states(self) -> None:
        """Forget the carried LSTM state (state="carry"): the next batch starts from zeros."""
        self.elmo_bilm.reset_states()

    # -- the carried state as numpy, for resumable files --
    def get_state(self) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        states = self.elmo_bilm._elmo_lstm._states
        if self.state != "carry" or states is None:
            return None
        return tuple(s.detach().to("cpu", torch.float64 if s.dtype == torch.float64 else torch.float32).numpy()
                     for s in states)  # type: ignore[return-value]

    def set_state(self, state: Optional[Tuple[np.ndarray, np.ndarray]]) -> None:
        lstm = self.elmo_bilm._elmo_lstm
        lstm._states = None if state is None else tuple(
            torch.from_numpy(np.asarray(s)).to(device=self.device, dtype=self.dtype) for s in state)

    @torch.no_grad()
    def batch_to_embeddings(self, batch: List[List[str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """batch: B tokenized sentences -> (activations (B, L + 1, T, D), mask (B, T)), boundaries removed."""
        char_ids = batch_to_ids(batch).to(self.device)
        if self._warm is not None:
            rows = char_ids.shape[0]
            h, c = self._warm
            self.elmo_bilm._elmo_lstm._states = (h.expand(-1, rows, -1), c.expand(-1, rows, -1))
        bilm_output = self.elmo_bilm(char_ids)
        layer_activations = bilm_output["activations"]
        mask_with_bos_eos = bilm_output["mask"]
        without_bos_eos = [remove_sentence_boundaries(layer, mask_with_bos_eos) for layer in layer_activations]
        activations = torch.cat([ele[0].unsqueeze(1) for ele in without_bos_eos], dim=1)
        mask = without_bos_eos[0][1]
        return activations, mask

    def _numpy_batch(self, batch: List[List[str]]) -> np.ndarray:
        """(B, L + 1, T, D) numpy float32 (float64 for a float64 model)."""
        embeddings, _ = self.batch_to_embeddings(batch)
        if embeddings.dtype in (torch.float16, torch.bfloat16):
            embeddings = embeddings.float()
        return embeddings.cpu().numpy()

    def embed_sentence(self, sentence: List[str]) -> np.ndarray:
        """One tokenized sentence -> (L + 1, len, D)."""
        return self.embed_batch([sentence])[0]

    def embed_batch(self, batch: List[List[str]]) -> List[np.ndarray]:
        """B tokenized sentences -> B arrays (L + 1, len_b, D) (Note [empty sentence] for len_b = 0)."""
        if batch == [[]]:
            return [empty_embedding()]
        embeddings = self._numpy_batch(batch)
        out = []
        for i, sentence in enumerate(batch):
            length = len(sentence)
            out.append(empty_embedding() if length == 0 else embeddings[i, :, :length, :])
        return out

    def embed_sentences(self, sentences: Iterable[List[str]], batch_size: int = DEFAULT_BATCH_SIZE
                        ) -> Iterator[np.ndarray]:
        """Lazily embed an iterable of tokenized sentences, `batch_size` consecutive sentences at a time."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch: List[List[str]] = []
        for sentence in sentences:
            batch.append(sentence)
            if len(batch) == batch_size:
                yield from self.embed_batch(batch)
                batch = []
        if batch:
            yield from self.embed_batch(batch)

    def embed_file(self, input_file: Any, output_file_path: str, output_format: str = "all",
                   batch_size: int = DEFAULT_BATCH_SIZE, forget_sentences: bool = False,
                   use_sentence_keys: bool = False, *, max_tokens_per_batch: Optional[int] = None,
                   resume: bool = False, overwrite: bool = True, encoding_errors: str = "strict",
                   sort: Optional[bool] = None, progress: bool = False) -> Dict[str, Any]:
        """Embed a corpus (one whitespace-tokenized sentence per line) into `allennlp elmo`'s hdf5 layout.

        input_file: a path, "-" (stdin) or an open file object. output_format: "all" (L + 1, len, D) |
        "top" (len, D) | "average" (len, D), float32. Keys "0", "1", ... (or the stripped line with
        use_sentence_keys; a duplicate is an error) and "sentence_to_index" (JSON {sentence: key})
        unless forget_sentences or use_sentence_keys. Blank lines are an error listing their indices.
        Streams the input; writes and flushes once per batch; resumable (elmo_fast.corpus).
        overwrite=True replaces an existing file as AllenNLP does (the CLI defaults to refusing).
        Returns a summary dict (lines, tokens, seconds, ...).
        """
        from elmo_fast.corpus import embed_corpus

        return embed_corpus(self, input_file, output_file_path, output_format=output_format, batch_size=batch_size,
                            forget_sentences=forget_sentences, use_sentence_keys=use_sentence_keys,
                            max_tokens_per_batch=max_tokens_per_batch, resume=resume, overwrite=overwrite,
                            encoding_errors=encoding_errors, sort=sort, progress=progress)

    def embed_fasta(self, input_file: Any, output_file_path: str, output_format: str = "all",
                    batch_size: int = DEFAULT_BATCH_SIZE, *, max_tokens_per_batch: Optional[int] = None,
                    resume: bool = False, overwrite: bool = True, encoding_errors: str = "strict",
                    sort: Optional[bool] = None, progress: bool = False) -> Dict[str, Any]:
        """Embed protein (or any) sequences from a FASTA file, SeqVec-style: each record is one sentence of
        one-residue tokens, written as `embed_file` writes a line, keyed by the record's id (the first word of
        its header); no "sentence_to_index". Multi-line records, blank lines skipped; duplicate ids, data
        before the first header and headers without an id are errors (Note [FASTA input] in embed_io); an
        empty record gets AllenNLP's empty embedding. `max_tokens_per_batch` budgets residues per batch as
        rows x (longest + 2); a longer sequence runs alone. Long sequences (10 000+ residues) run in memory
        linear in their length (Note [chunked input GEMM] in csrc/common/lstm_driver.h).
        """
        from elmo_fast.corpus import embed_corpus

        return embed_corpus(self, input_file, output_file_path, output_format=output_format, batch_size=batch_size,
                            max_tokens_per_batch=max_tokens_per_batch, resume=resume, overwrite=overwrite,
                            encoding_errors=encoding_errors, sort=sort, progress=progress, input_format="fasta")
