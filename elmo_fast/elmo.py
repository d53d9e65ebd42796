"""AllenNLP-compatible ELMo modules (spec §4-§6) on elmo_fast's fused ops.

Same constructors, forward outputs and state_dict keys as AllenNLP 0.9's `allennlp.modules.elmo`
(`Elmo`, `_ElmoBiLm`, `_ElmoCharacterEncoder`, `ScalarMix`) and `elmo_lstm.ElmoLstm`, so an AllenNLP
checkpoint loads with strict=True. The three hot paths go through elmo_fast.functional
(char_cnn, highway, lstm_projection); everything around them is plain, compile-friendly torch.

Shape letters (spec): B sentences, T tokens without boundaries (T + 2 with `<S>` / `</S>`), W = 50
chars per token, d char embedding width, F char-CNN filters, P projection_dim, n lstm.dim,
L n_layers (the biLM returns L + 1 activation layers), R output representations.

Note [stateful ELMo]: AllenNLP and bilm-tf carry the LSTM state across calls, per batch row index
(spec §5.5). `stateful=True` (the default) reproduces that exactly: the state (h, c), of shapes
(L, rows, 2P) / (L, rows, 2n) with forward | backward halves, is a plain attribute (not in the
state_dict), detached after every call; a larger batch extends it with zero rows, a smaller batch
uses and updates only its first rows and keeps the rest; reset_states() clears it. AllenNLP keeps
the old state of a row whose new layer-0 h sums to exactly 0, meant for rows it did not run; here a
row the LSTM does not run (length 0, only possible when ElmoLstm is used alone) keeps its state
because the op returns h0 / c0 for it, and rows that ran are always updated. `stateful=False`
starts every call from zeros: deterministic and independent of batch order and composition.
"""
import logging
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from elmo_fast import cuda_graphs, functional, wavefront
from elmo_fast.nn.lstm import LstmCellWithProjection
from elmo_fast.chars import BOS_CHARS, EOS_CHARS, MAX_CHARS, N_CHARACTERS, token_to_ids
from elmo_fast.weights import load_weights

__all__ = ["Elmo", "ElmoBiLm", "_ElmoBiLm", "ElmoCharacterEncoder", "_ElmoCharacterEncoder", "ElmoLstm",
           "ScalarMix", "add_sentence_boundary_token_ids", "remove_sentence_boundaries"]

logger = logging.getLogger(__name__)

# AllenNLP 0.9.0's ScalarMix adds 1e-12 to the variance (>= 1.0 uses tiny_value_of_dtype: 1e-13).
LAYER_NORM_EPS = 1e-12


# --- input checks -------------------------------------------------------------------------------

# Note [encoder chunks]: under no_grad the character encoder runs at most ENCODE_CHUNK_ROWS token rows per
# call (char-CNN, highway and projection are row-wise), so its working memory (a few (rows, F) buffers) is
# bounded however long the sentence (a 10 000-residue protein) or large the batch. With autograd on, every
# row runs at once as before (the saved activations are needed anyway).
ENCODE_CHUNK_ROWS = 4096


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_char_ids(inputs: Any, name: str = "inputs", exact_rank: Optional[int] = None) -> torch.Tensor:
    """Clear errors for character-id tensors: integer dtype, (..., T, 50), values 0..261."""
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of character ids (see elmo_fast.batch_to_ids), "
                        f"got {type(inputs).__name__}")
    if inputs.dtype.is_floating_point or inputs.dtype.is_complex or inputs.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of character ids (see elmo_fast.batch_to_ids), "
                        f"got dtype {inputs.dtype}")
    if exact_rank is not None and inputs.dim() != exact_rank:
        raise ValueError(f"{name} must have shape (batch, timesteps, {MAX_CHARS}), got {tuple(inputs.shape)}")
    if inputs.dim() < 3:
        raise ValueError(f"{name} must have shape (..., batch, timesteps, {MAX_CHARS}) with at least 3 dims, "
                         f"got {tuple(inputs.shape)}")
    if inputs.shape[-1] != MAX_CHARS:
        raise ValueError(f"{name} must have {MAX_CHARS} character ids per token (last dim), "
                         f"got shape {tuple(inputs.shape)}")
    # A value check reads the data (a device sync), so it runs in eager mode only; under
    # torch.compile the ops' own checks are the last line of defence.
    if not _is_compiling() and inputs.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(inputs))
        if low < 0 or high >= N_CHARACTERS:
            raise ValueError(f"{name} must hold character ids in 0..{N_CHARACTERS - 1} (raw id + 1, 0 = padding), "
                             f"found values in {low}..{high}")
    return inputs


def _check_word_ids(word_inputs: Any, name: str = "word_inputs") -> torch.Tensor:
    if not isinstance(word_inputs, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of word ids, got {type(word_inputs).__name__}")
    if word_inputs.dtype.is_floating_point or word_inputs.dtype.is_complex or word_inputs.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of word ids, got dtype {word_inputs.dtype}")
    if word_inputs.dim() < 2:
        raise ValueError(f"{name} must have shape (..., batch, timesteps), got {tuple(word_inputs.shape)}")
    return word_inputs


# --- sentence boundaries ------------------------------------------------------------------------

def add_sentence_boundary_token_ids(tensor: torch.Tensor, mask: torch.Tensor, sentence_begin_token: torch.Tensor,
                                    sentence_end_token: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Put `<S>` at position 0 and `</S>` at position len_b + 1 of every row (spec §4.1).

    tensor: (B, T, D) (char ids, D = 50, or vectors, D = P); mask: (B, T) bool, right-padded;
    sentence_begin_token / sentence_end_token: (D,). Returns (B, T + 2, D) and mask (B, T + 2) bool.
    Positions 1..T hold `tensor` as is (also its padded positions), T + 1 holds zeros unless it is
    the `</S>` slot. Vectorized form of AllenNLP's loop (same values; no data-dependent control flow).
    """
    batch, steps = mask.shape
    lengths = mask.sum(dim=-1)
    padded = nn.functional.pad(tensor, (0, 0, 1, 1))
    position = torch.arange(steps + 2, device=tensor.device)
    is_bos = (position == 0).view(1, steps + 2, 1)
    is_eos = (position.unsqueeze(0) == (lengths + 1).unsqueeze(1)).unsqueeze(-1)   # (B, T + 2, 1)
    begin = sentence_begin_token.to(device=tensor.device, dtype=tensor.dtype)
    end = sentence_end_token.to(device=tensor.device, dtype=tensor.dtype)
    out = torch.where(is_bos, begin, torch.where(is_eos, end, padded))
    new_mask = nn.functional.pad(mask.bool(), (1, 1)) | is_bos.squeeze(-1) | is_eos.squeeze(-1)
    return out, new_mask


def remove_sentence_boundaries(tensor: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AllenNLP's `remove_sentence_boundaries` (spec §6.2 step 4), vectorized.

    tensor: (B, T + 2, D); mask: (B, T + 2). Returns (B, T, D) and mask (B, T) bool: positions
    0..len_b - 3 hold input positions 1..len_b - 2, the rest are zero (rows with len_b <= 2: all).
    """
    lengths = mask.long().sum(dim=-1)
    steps = tensor.shape[1] - 2
    position = torch.arange(steps, device=tensor.device)
    new_mask = position.unsqueeze(0) < (lengths - 2).unsqueeze(1)
    out = torch.where(new_mask.unsqueeze(-1), tensor[:, 1:steps + 1], torch.zeros((), dtype=tensor.dtype,
                                                                                   device=tensor.device))
    return out, new_mask


# --- char encoder -------------------------------------------------------------------------------

def _sub_state(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


class _Highway(nn.Module):
    """AllenNLP's `Highway` (keys `_layers.{k}.weight/bias`, Linear(F, 2F)); math in functional.highway."""

    def __init__(self, input_dim: int, num_layers: int = 1):
        super().__init__()
        self._input_dim = input_dim
        layers = []
        for _ in range(num_layers):
            layer = nn.Linear(input_dim, input_dim * 2)
            # AllenNLP: bias the gate (second half) towards passing the input through.
            nn.init.constant_(layer.bias[input_dim:], 1.0)
            layers.append(layer)
        self._layers = nn.ModuleList(layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if len(self._layers) == 0:
            return inputs
        return functional.highway(inputs, [layer.weight for layer in self._layers],
                                  [layer.bias for layer in self._layers])


class ElmoCharacterEncoder(nn.Module):
    """AllenNLP's `_ElmoCharacterEncoder`: char ids -> context-independent token vectors (spec §4).

    Parameters (state_dict keys as AllenNLP): `_char_embedding_weights` (262, d), `char_conv_{i}`
    (Conv1d d -> m_i, width w_i), `_highways._layers.{k}` (Linear F -> 2F), `_projection` (Linear F -> P).
    forward(inputs (B, T, 50) ids without boundaries) -> {"mask": (B, T + 2) bool,
    "token_embedding": (B, T + 2, P)}; padding tokens get the (constant) vector of an all-zero id row.
    """

    def __init__(self, options_file, weight_file, requires_grad: bool = False):
        super().__init__()
        options, state = load_weights(options_file, weight_file)
        self._build(options, requires_grad)
        self.load_state_dict(_sub_state(state, "_token_embedder."), strict=True, assign=True)

    @classmethod
    def _from_options(cls, options: Dict[str, Any], requires_grad: bool) -> "ElmoCharacterEncoder":
        """Parameters on the meta device (no init cost), to be filled by load_state_dict(assign=True)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._build(options, requires_grad)
        return module

    def _build(self, options: Dict[str, Any], requires_grad: bool) -> None:
        self._options = options
        self.output_dim = options["lstm"]["projection_dim"]
        self.requires_grad = requires_grad
        cnn = options["char_cnn"]
        self._activation = cnn["activation"]
        d, filters = cnn["embedding"]["dim"], cnn["filters"]
        n_filters = sum(m for _, m in filters)
        with torch.device("meta"):
            self._char_embedding_weights = nn.Parameter(torch.empty(N_CHARACTERS, d))
            convolutions = []
            for i, (width, num) in enumerate(filters):
                conv = nn.Conv1d(d, num, kernel_size=width, bias=True)
                self.add_module(f"char_conv_{i}", conv)
                convolutions.append(conv)
            self._highways = _Highway(n_filters, cnn.get("n_highway") or 0)
            self._projection = nn.Linear(n_filters, self.output_dim, bias=True)
        self._convolutions = convolutions       # plain list, as AllenNLP (the modules are registered above)
        for parameter in self.parameters():
            parameter.requires_grad_(requires_grad)
        # +1-shifted ids of <S> / </S>: plain tensors (no buffers, as AllenNLP).
        self._beginning_of_sentence_characters = torch.tensor(BOS_CHARS, dtype=torch.long, device="cpu")
        self._end_of_sentence_characters = torch.tensor(EOS_CHARS, dtype=torch.long, device="cpu")

    def get_output_dim(self) -> int:
        return self.output_dim

    def embed_ids(self, char_ids: torch.Tensor) -> torch.Tensor:
        """char_ids (N, 50) long -> (N, P): char-CNN, highways, projection (no boundaries, no mask)."""
        x = functional.char_cnn(char_ids, self._char_embedding_weights, [c.weight for c in self._convolutions],
                                [c.bias for c in self._convolutions], self._activation)
        x = self._highways(x)
        return self._projection(x)

    def _embed_distinct(self, char_ids: torch.Tensor) -> torch.Tensor:
        """embed_ids, computed once per distinct row of char_ids (N, 50) and gathered back.

        Note [exact token dedup]: a token's vector is a pure function of its 50 ids, and real text
        repeats itself (BOS/EOS rows everywhere, "the", ",", padding rows), so encoding each distinct
        row once gives the same numbers as encoding every row while running the char-CNN, highway and
        projection GEMMs on typically 35-45% of the rows; autograd's gather backward sums the
        gradients of repeated tokens. Under torch.compile the data-dependent row count of
        torch.unique would break the graph, so compiled code encodes every row.
        """
        if _is_compiling() or char_ids.shape[0] <= 1:
            return self.embed_ids(char_ids)
        distinct, inverse = torch.unique(char_ids, dim=0, return_inverse=True)
        if distinct.shape[0] == char_ids.shape[0]:
            return self._embed_chunked(char_ids)
        return self._embed_chunked(distinct).index_select(0, inverse)

    def _embed_chunked(self, char_ids: torch.Tensor) -> torch.Tensor:
        """embed_ids, ENCODE_CHUNK_ROWS rows per call under no_grad (Note [encoder chunks])."""
        rows = char_ids.shape[0]
        if rows <= ENCODE_CHUNK_ROWS or torch.is_grad_enabled():
            return self.embed_ids(char_ids)
        out = char_ids.new_empty((rows, self.output_dim), dtype=self._projection.weight.dtype)
        for start in range(0, rows, ENCODE_CHUNK_ROWS):
            out[start:start + ENCODE_CHUNK_ROWS] = self.embed_ids(char_ids[start:start + ENCODE_CHUNK_ROWS])
        return out

    def forward(self, inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
        inputs = _check_char_ids(inputs, exact_rank=3).long()
        mask = (inputs > 0).any(dim=-1)
        ids, mask_with_bos_eos = add_sentence_boundary_token_ids(
            inputs, mask, self._beginning_of_sentence_characters, self._end_of_sentence_characters)
        batch, steps, _ = ids.shape
        token_embedding = self._embed_distinct(ids.reshape(batch * steps, MAX_CHARS))
        return {"mask": mask_with_bos_eos, "token_embedding": token_embedding.view(batch, steps, self.output_dim)}


_ElmoCharacterEncoder = ElmoCharacterEncoder


# --- LSTM ---------------------------------------------------------------------------------------

class ElmoLstm(nn.Module):
    """AllenNLP's `ElmoLstm`: L layers of LSTM-with-projection per direction, independent forward and
    backward stacks, skip connections (on outputs only) for layers >= 1 (spec §5.3).

    Submodules `forward_layer_{l}` / `backward_layer_{l}`. forward(inputs (B, T, I), mask (B, T))
    -> (L, B, T, 2P), forward half first, zero at masked positions; padded positions are never read.
    State: see Note [stateful ELMo] at the top of this file. recurrent dropout is not supported
    (ELMo builds ElmoLstm with 0.0; spec §5.4).
    """

    def __init__(self, input_size: int, hidden_size: int, cell_size: int, num_layers: int,
                 requires_grad: bool = False, recurrent_dropout_probability: float = 0.0,
                 memory_cell_clip_value: Optional[float] = None, state_projection_clip_value: Optional[float] = None,
                 *, stateful: bool = True):
        super().__init__()
        if recurrent_dropout_probability:
            raise ValueError("recurrent_dropout_probability must be 0.0: ELMo's biLM has no recurrent dropout "
                             f"(spec §5.4), got {recurrent_dropout_probability!r}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.cell_size = cell_size
        self.num_layers = num_layers
        self.requires_grad = requires_grad
        self.stateful = stateful
        self.cell_clip_value, self.proj_clip_value = memory_cell_clip_value, state_projection_clip_value
        self._states: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._graphs: Optional[cuda_graphs.GraphCache] = None  # Note [CUDA graphs]
        forward_layers, backward_layers = [], []
        lstm_input_size = input_size
        for layer_index in range(num_layers):
            forward_layer = LstmCellWithProjection(lstm_input_size, hidden_size, cell_size, True, 0.0,
                                                    memory_cell_clip_value, state_projection_clip_value)
            backward_layer = LstmCellWithProjection(lstm_input_size, hidden_size, cell_size, False, 0.0,
                                                     memory_cell_clip_value, state_projection_clip_value)
            lstm_input_size = hidden_size
            self.add_module(f"forward_layer_{layer_index}", forward_layer)
            self.add_module(f"backward_layer_{layer_index}", backward_layer)
            forward_layers.append(forward_layer)
            backward_layers.append(backward_layer)
        self.forward_layers = forward_layers
        self.backward_layers = backward_layers
        for parameter in self.parameters():
            parameter.requires_grad_(requires_grad)

    def reset_states(self, mask: Optional[torch.Tensor] = None) -> None:
        """Forget the carried state (all rows, or with `mask` (rows,) bool only the rows where it is True)."""
        if mask is None or self._states is None:
            self._states = None
            return
        rows = self._states[0].shape[1]
        keep = ~mask.to(device=self._states[0].device, dtype=torch.bool)[:rows].view(1, -1, 1)
        self._states = tuple(state * keep.to(state.dtype) for state in self._states)  # type: ignore[assignment]

    def _initial_state(self, batch: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape_h = (self.num_layers, batch, 2 * self.hidden_size)
        shape_c = (self.num_layers, batch, 2 * self.cell_size)
        if not self.stateful or self._states is None:
            return like.new_zeros(shape_h), like.new_zeros(shape_c)
        out = []
        for state, shape in zip(self._states, (shape_h, shape_c)):
            state = state.to(device=like.device, dtype=like.dtype)
            rows = state.shape[1]
            if rows >= batch:
                out.append(state[:, :batch])
            else:   # rows never seen before start from zeros
                out.append(torch.cat([state, state.new_zeros(shape[0], batch - rows, shape[2])], dim=1))
        return out[0], out[1]

    def _update_states(self, h_n: torch.Tensor, c_n: torch.Tensor) -> None:
        h_n, c_n = h_n.detach(), c_n.detach()
        if self._states is not None:
            old_h, old_c = self._states
            batch = h_n.shape[1]
            if old_h.shape[1] > batch:   # a smaller batch keeps the rows it did not use
                h_n = torch.cat([h_n, old_h[:, batch:].to(h_n)], dim=1)
                c_n = torch.cat([c_n, old_c[:, batch:].to(c_n)], dim=1)
        self._states = (h_n, c_n)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_size:
            raise ValueError(f"inputs must have shape (batch, timesteps, {self.input_size}), got {tuple(inputs.shape)}")
        if mask.shape != inputs.shape[:2]:
            raise ValueError(f"mask must have shape (batch, timesteps) = {tuple(inputs.shape[:2])}, "
                             f"got {tuple(mask.shape)}")
        batch = inputs.shape[0]
        lengths = mask.long().sum(dim=-1).cpu()
        h0, c0 = self._initial_state(batch, inputs)
        if self.num_layers == 0:
            return inputs.new_zeros(0, batch, inputs.shape[1], 2 * self.hidden_size)
        if self._use_graphs(inputs, h0):
            if self._graphs is None:
                self._graphs = cuda_graphs.GraphCache()
            key = (tuple(inputs.shape), inputs.dtype, inputs.device, tuple(lengths.tolist()),
                   tuple(p.data_ptr() for p in self.parameters()), self.cell_clip_value, self.proj_clip_value)
            outputs, h_n, c_n = self._graphs(key, lambda x, h, c: self._run_stack(x, lengths, h, c), inputs, h0, c0)
        else:  # on many-core CPUs the layers may run as a pipeline (Note [wavefront], elmo_fast/wavefront.py)
            outputs, h_n, c_n = wavefront.run(self, inputs, lengths, h0, c0,
                                              lambda: self._run_stack(inputs, lengths, h0, c0))
        if self.stateful:
            self._update_states(h_n, c_n)
        return outputs

    def _use_graphs(self, inputs: torch.Tensor, h0: torch.Tensor) -> bool:
        """Note [CUDA graphs] (elmo_fast/cuda_graphs.py): inference on CUDA, when asked for."""
        if inputs.device.type != "cuda" or inputs.shape[0] == 0 or torch.compiler.is_compiling():
            return False
        if functional._needs_grad(inputs, h0, *self.parameters()):
            return False
        return cuda_graphs.enabled()

    def __getstate__(self):  # captured graphs are neither copied nor pickled
        state = self.__dict__.copy()
        state["_graphs"] = None
        return state

    def _run_stack(self, inputs: torch.Tensor, lengths: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor):
        """The layers over inputs (B, T, I) with lengths (B,) on the CPU -> (L, B, T, 2P), h_n, c_n:
        no host synchronisation, so that a CUDA graph can capture it."""
        p, n = self.hidden_size, self.cell_size
        in_fwd = in_bwd = inputs
        outputs, h_n, c_n = [], [], []
        for layer_index in range(self.num_layers):
            layers = (self.forward_layers[layer_index], self.backward_layers[layer_index])
            # One op for both directions, so the CPU may run them side by side (functional.lstm_bidirectional).
            (out_fwd, out_bwd), (h_fwd, h_bwd), (c_fwd, c_bwd) = functional.lstm_bidirectional(
                [in_fwd, in_bwd], lengths, [layer.weights() for layer in layers],
                [h0[layer_index, :, :p], h0[layer_index, :, p:]], [c0[layer_index, :, :n], c0[layer_index, :, n:]],
                self.cell_clip_value, self.proj_clip_value)
            if layer_index != 0:   # skip connections: the output only; the recurrent state is un-summed
                out_fwd = out_fwd + in_fwd
                out_bwd = out_bwd + in_bwd
            outputs.append(torch.cat([out_fwd, out_bwd], dim=-1))
            h_n.append(torch.cat([h_fwd, h_bwd], dim=-1))
            c_n.append(torch.cat([c_fwd, c_bwd], dim=-1))
            in_fwd, in_bwd = out_fwd, out_bwd
        return torch.stack(outputs), torch.stack(h_n), torch.stack(c_n)


# --- biLM ---------------------------------------------------------------------------------------

class ElmoBiLm(nn.Module):
    """AllenNLP's `_ElmoBiLm` (spec §6.1): char encoder + ElmoLstm, loaded from bilm-tf files.

    Submodules `_token_embedder` (ElmoCharacterEncoder), `_elmo_lstm` (ElmoLstm) and, with
    vocab_to_cache, `_word_embedding` (Embedding (V, P), row i = vocab_to_cache[i]).
    forward(inputs (B, T, 50), word_inputs (B, T) or None) -> {"activations": [A_0 .. A_L] each
    (B, T + 2, 2P), "mask": (B, T + 2) bool}; A_0 = concat(tok, tok) * mask.
    """

    def __init__(self, options_file, weight_file, requires_grad: bool = False,
                 vocab_to_cache: Optional[List[str]] = None, *, stateful: bool = True):
        super().__init__()
        options, state = load_weights(options_file, weight_file)
        self._options = options
        self._token_embedder = ElmoCharacterEncoder._from_options(options, requires_grad)
        self._token_embedder.load_state_dict(_sub_state(state, "_token_embedder."), strict=True, assign=True)
        self._requires_grad = requires_grad
        if requires_grad and vocab_to_cache:
            logger.warning("You are fine tuning ELMo and caching char CNN word vectors. This behaviour is not "
                           "guaranteed to be well defined, particularly if not all of your inputs will occur "
                           "in the vocabulary cache.")
        self._word_embedding: Optional[nn.Embedding] = None
        self._bos_embedding: Optional[torch.Tensor] = None
        self._eos_embedding: Optional[torch.Tensor] = None
        if vocab_to_cache:
            self.create_cached_cnn_embeddings(vocab_to_cache)
        lstm = options["lstm"]
        with torch.device("meta"):
            self._elmo_lstm = ElmoLstm(input_size=lstm["projection_dim"], hidden_size=lstm["projection_dim"],
                                       cell_size=lstm["dim"], num_layers=lstm["n_layers"],
                                       memory_cell_clip_value=lstm["cell_clip"],
                                       state_projection_clip_value=lstm["proj_clip"], requires_grad=requires_grad,
                                       stateful=stateful)
        self._elmo_lstm.load_state_dict(_sub_state(state, "_elmo_lstm."), strict=True, assign=True)
        # Number of representation layers including the context-independent one.
        self.num_layers = lstm["n_layers"] + 1

    def get_output_dim(self) -> int:
        return 2 * self._token_embedder.get_output_dim()

    def reset_states(self) -> None:
        self._elmo_lstm.reset_states()

    @torch.no_grad()
    def create_cached_cnn_embeddings(self, tokens: List[str]) -> None:
        """Precompute the token vectors of `tokens` (and of `<S>`, `</S>`) for the word-id path.

        Sets `_word_embedding` (Embedding (V, P), padding_idx 0 as AllenNLP, trainable iff
        requires_grad) and the plain tensors `_bos_embedding` / `_eos_embedding` (P,). A token's vector
        does not depend on its context, so each is computed from its own 50 char ids.
        """
        words = ["<S>", "</S>"] + list(tokens)
        weight = self._token_embedder._char_embedding_weights
        chunks = []
        for start in range(0, len(words), 1024):
            ids = torch.tensor([token_to_ids(w) for w in words[start:start + 1024]], dtype=torch.long,
                               device=weight.device)
            chunks.append(self._token_embedder.embed_ids(ids))
        full = torch.cat(chunks)
        self._bos_embedding = full[0].clone()
        self._eos_embedding = full[1].clone()
        embedding = nn.Embedding(len(tokens), full.shape[1], padding_idx=0, _weight=full[2:].clone(),
                                 device=weight.device, dtype=weight.dtype)
        embedding.weight.requires_grad_(self._requires_grad)
        self._word_embedding = embedding

    def _word_ids_in_range(self, word_inputs: torch.Tensor) -> bool:
        if _is_compiling() or word_inputs.numel() == 0:
            return True
        return bool(word_inputs.min() >= 0) and bool(word_inputs.max() < self._word_embedding.num_embeddings)

    def forward(self, inputs: Optional[torch.Tensor], word_inputs: Optional[torch.Tensor] = None
                ) -> Dict[str, Any]:
        type_representation = None
        if self._word_embedding is not None and word_inputs is not None:
            word_inputs = _check_word_ids(word_inputs)
            if word_inputs.dim() != 2:
                raise ValueError(f"word_inputs must have shape (batch, timesteps), got {tuple(word_inputs.shape)}")
            if self._word_ids_in_range(word_inputs):
                # Mask from the word ids (id 0 = padding); see Note [cached vocabulary mask] in Elmo.
                mask_without_bos_eos = word_inputs > 0
                embedded = self._word_embedding(word_inputs)
                type_representation, mask = add_sentence_boundary_token_ids(
                    embedded, mask_without_bos_eos, self._bos_embedding, self._eos_embedding)
            elif inputs is None:
                raise ValueError(f"word_inputs must hold ids in 0..{self._word_embedding.num_embeddings - 1} "
                                 f"(the cached vocabulary) when no character ids are given")
            else:   # AllenNLP backs off to the char-CNN when the cache lookup fails
                warnings.warn("word_inputs has ids outside the cached vocabulary; running the character CNN")
        if type_representation is None:
            if inputs is None:
                raise ValueError("inputs (character ids) must be given unless word_inputs are used with "
                                 "a cached vocabulary")
            token_embedding = self._token_embedder(inputs)
            mask = token_embedding["mask"]
            type_representation = token_embedding["token_embedding"]
        lstm_outputs = self._elmo_lstm(type_representation, mask)
        output_tensors = [torch.cat([type_representation, type_representation], dim=-1)
                          * mask.unsqueeze(-1).to(type_representation.dtype)]
        output_tensors.extend(lstm_outputs.unbind(0))
        return {"activations": output_tensors, "mask": mask}


_ElmoBiLm = ElmoBiLm


# --- scalar mix and Elmo ------------------------------------------------------------------------

class ScalarMix(nn.Module):
    """AllenNLP 0.9's `ScalarMix` (spec §6.2 step 3): gamma * sum_j softmax(w)_j * N(A_j).

    Parameters `scalar_parameters.{j}` (each a 1-element tensor, init 0.0 or
    initial_scalar_parameters) and `gamma` (1-element, init 1.0), trainable iff `trainable`.
    With do_layer_norm, N(A) = (A - mean) / sqrt(var + 1e-12), one scalar mean and variance per
    layer over all unmasked elements (tokens x features) of the batch; padded positions are
    normalised too and not re-masked (AllenNLP 0.9.0 semantics, eps 1e-12).
    """

    def __init__(self, mixture_size: int, do_layer_norm: bool = False,
                 initial_scalar_parameters: Optional[Sequence[float]] = None, trainable: bool = True):
        super().__init__()
        self.mixture_size = mixture_size
        self.do_layer_norm = do_layer_norm
        if initial_scalar_parameters is None:
            initial_scalar_parameters = [0.0] * mixture_size
        elif len(initial_scalar_parameters) != mixture_size:
            raise ValueError(f"initial_scalar_parameters has {len(initial_scalar_parameters)} values but "
                             f"mixture_size is {mixture_size}")
        self.scalar_parameters = nn.ParameterList(
            [nn.Parameter(torch.tensor([float(v)], dtype=torch.float32), requires_grad=trainable)
             for v in initial_scalar_parameters])
        self.gamma = nn.Parameter(torch.tensor([1.0], dtype=torch.float32), requires_grad=trainable)

    def forward(self, tensors: Sequence[torch.Tensor], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tensors: mixture_size tensors (B, T, D); mask: (B, T) (needed for layer norm) -> (B, T, D)."""
        if len(tensors) != self.mixture_size:
            raise ValueError(f"tensors has {len(tensors)} tensors but mixture_size is {self.mixture_size}")
        normed_weights = torch.softmax(torch.cat(list(self.scalar_parameters)), dim=0).split(1)
        if not self.do_layer_norm:
            pieces = [weight * tensor for weight, tensor in zip(normed_weights, tensors)]
            return self.gamma * sum(pieces)
        if mask is None:
            raise ValueError("mask must be given when do_layer_norm is True")
        pieces = []
        for weight, tensor in zip(normed_weights, tensors):
            mask_float = mask.to(tensor.dtype)
            broadcast_mask = mask_float.unsqueeze(-1)
            num_elements_not_masked = mask_float.sum() * tensor.shape[-1]
            tensor_masked = tensor * broadcast_mask
            mean = tensor_masked.sum() / num_elements_not_masked
            variance = (((tensor_masked - mean) * broadcast_mask) ** 2).sum() / num_elements_not_masked
            pieces.append(weight * ((tensor - mean) / torch.sqrt(variance + LAYER_NORM_EPS)))
        return self.gamma * sum(pieces)


class Elmo(nn.Module):
    """AllenNLP 0.9's `Elmo` (spec §6.2): R independent scalar mixes of the biLM's L + 1 layers.

    Elmo(options_file, weight_file, num_output_representations, requires_grad=False,
    do_layer_norm=False, dropout=0.5, vocab_to_cache=None, keep_sentence_boundaries=False,
    scalar_mix_parameters=None, module=None, *, stateful=True).
    forward(inputs (..., T, 50) char ids, word_inputs (..., T) or None) ->
    {"elmo_representations": R tensors (..., T, 2P), "mask": (..., T) bool} (T + 2 with
    keep_sentence_boundaries). state_dict keys: `_elmo_lstm.*` (the ElmoBiLm) and
    `scalar_mix_{r}.gamma`, `scalar_mix_{r}.scalar_parameters.{j}`.

    Note [cached vocabulary mask]: with vocab_to_cache and word_inputs, the mask is word_ids > 0
    plus the boundaries, so the word path gives the same outputs as the char path. (AllenNLP builds
    it from "any embedding component > 0", which marks padded positions as real whenever the vector
    of vocabulary entry 0 has a positive component; that quirk is not reproduced.)
    """

    def __init__(self, options_file, weight_file, num_output_representations: int, requires_grad: bool = False,
                 do_layer_norm: bool = False, dropout: float = 0.5, vocab_to_cache: Optional[List[str]] = None,
                 keep_sentence_boundaries: bool = False, scalar_mix_parameters: Optional[List[float]] = None,
                 module: Optional[nn.Module] = None, *, stateful: bool = True):
        super().__init__()
        if module is not None:
            if options_file is not None or weight_file is not None:
                raise ValueError("Don't provide options_file or weight_file with module")
            self._elmo_lstm = module
        else:
            self._elmo_lstm = ElmoBiLm(options_file, weight_file, requires_grad=requires_grad,
                                       vocab_to_cache=vocab_to_cache, stateful=stateful)
        self._has_cached_vocab = vocab_to_cache is not None
        self._keep_sentence_boundaries = keep_sentence_boundaries
        self._dropout = nn.Dropout(p=dropout)
        self._scalar_mixes: List[ScalarMix] = []
        for k in range(num_output_representations):
            scalar_mix = ScalarMix(self._elmo_lstm.num_layers, do_layer_norm=do_layer_norm,
                                   initial_scalar_parameters=scalar_mix_parameters,
                                   trainable=scalar_mix_parameters is None)
            self.add_module(f"scalar_mix_{k}", scalar_mix)
            self._scalar_mixes.append(scalar_mix)

    def get_output_dim(self) -> int:
        return self._elmo_lstm.get_output_dim()

    @property
    def num_layers(self) -> int:
        """Layers mixed by each ScalarMix: the biLM's L + 1."""
        return self._elmo_lstm.num_layers

    def reset_states(self) -> None:
        """Forget the biLM's carried LSTM state (Note [stateful ELMo])."""
        self._elmo_lstm.reset_states()

    def forward(self, inputs: torch.Tensor, word_inputs: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        inputs = _check_char_ids(inputs)
        original_shape = inputs.shape
        timesteps = original_shape[-2]
        reshaped_inputs = inputs.reshape(-1, timesteps, MAX_CHARS) if inputs.dim() > 3 else inputs
        reshaped_word_inputs = None
        if word_inputs is not None:
            word_inputs = _check_word_ids(word_inputs)
            if not self._has_cached_vocab:
                warnings.warn("Word inputs were passed to ELMo but it does not have a cached vocab.")
            else:
                if tuple(word_inputs.shape) != tuple(original_shape[:-1]):
                    raise ValueError(f"word_inputs must have shape {tuple(original_shape[:-1])} (inputs without "
                                     f"the last dim), got {tuple(word_inputs.shape)}")
                reshaped_word_inputs = word_inputs.reshape(-1, timesteps)

        bilm_output = self._elmo_lstm(reshaped_inputs, reshaped_word_inputs)
        layer_activations = bilm_output["activations"]
        mask_with_bos_eos = bilm_output["mask"]

        representations = []
        processed_mask = mask_with_bos_eos
        for scalar_mix in self._scalar_mixes:
            representation_with_bos_eos = scalar_mix(layer_activations, mask_with_bos_eos)
            if self._keep_sentence_boundaries:
                processed_representation, processed_mask = representation_with_bos_eos, mask_with_bos_eos
            else:
                processed_representation, processed_mask = remove_sentence_boundaries(
                    representation_with_bos_eos, mask_with_bos_eos)
            representations.append(self._dropout(processed_representation))

        if not self._scalar_mixes and not self._keep_sentence_boundaries:
            _, processed_mask = remove_sentence_boundaries(layer_activations[0], mask_with_bos_eos)
        processed_mask = processed_mask.bool()
        if inputs.dim() > 3:
            leading = tuple(original_shape[:-2])
            steps = processed_mask.shape[-1]
            processed_mask = processed_mask.reshape(leading + (steps,))
            representations = [r.reshape(leading + (steps, r.shape[-1])) for r in representations]
        return {"elmo_representations": representations, "mask": processed_mask}
