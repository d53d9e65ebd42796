"""Plain-PyTorch ELMo, transcribed from ../shared/elmo-spec.md for clarity, not speed.

This module is the oracle every fused op and module is tested against: float64-capable, loops
allowed, no fusion, no cleverness. It imports only torch. Shape letters follow the spec:
N tokens, F char-CNN filters, B rows, T steps, I inputs, n cells, P projection.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["highway", "char_cnn", "lstm_projection", "add_sentence_boundaries", "remove_sentence_boundaries",
           "char_encoder", "elmo_lstm", "elmo_bilm", "scalar_mix"]


def highway(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]) -> torch.Tensor:
    """AllenNLP's highway stack (spec §4.2 step 4).

    x: (N, F); weights[k]: (2F, F); biases[k]: (2F,). Per layer:
    proj = x @ W^T + b; nonlinear, gate = proj[:, :F], proj[:, F:];
    x <- sigmoid(gate) * x + (1 - sigmoid(gate)) * relu(nonlinear).
    """
    for weight, bias in zip(weights, biases):
        projected = torch.nn.functional.linear(x, weight, bias)
        nonlinear, gate = projected.chunk(2, dim=-1)
        gate = torch.sigmoid(gate)
        x = gate * x + (1 - gate) * torch.relu(nonlinear)
    return x


# --------------------------------------------------------------------------------------------------
# char_cnn and lstm_projection: the op oracles (same signatures as elmo_fast.functional).
# --------------------------------------------------------------------------------------------------

def char_cnn(char_ids: torch.Tensor, embedding: torch.Tensor, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor], activation: str = "relu") -> torch.Tensor:
    """The char-CNN of spec §4.2 steps 1-3 (AllenNLP's `_ElmoCharacterEncoder` before the highways).

    char_ids: (N, C) integer, values 0..261 (+1-shifted ids; 0 = the "no token" slot, row 0 of
    `embedding`); embedding: (262, d); weights[i]: (m_i, d, w_i) (Conv1d layout, w_i <= C);
    biases[i]: (m_i,); activation: "relu" or "tanh".
    Returns (N, F), F = sum m_i: concat_i act(max_t(b_i + sum_{k,c} e[t+k, c] * W_i[:, c, k])),
    the max over all C - w_i + 1 valid positions, the bias added before the max, act after it.
    """
    if activation == "relu":
        act = torch.relu
    elif activation == "tanh":
        act = torch.tanh
    else:
        raise ValueError(f"activation must be 'relu' or 'tanh', got {activation!r}")
    # (N, C, d) -> (N, d, C): channels first, as Conv1d wants.
    emb = torch.nn.functional.embedding(char_ids.long(), embedding).transpose(1, 2)
    pooled = []
    for weight, bias in zip(weights, biases):
        conv = torch.nn.functional.conv1d(emb, weight, bias)      # (N, m_i, C - w_i + 1), valid, stride 1
        pooled.append(act(conv.max(dim=-1).values))               # (N, m_i)
    if not pooled:
        return emb.new_zeros(char_ids.shape[0], 0)
    return torch.cat(pooled, dim=-1)


def _clip(x: torch.Tensor, value: Optional[float]) -> torch.Tensor:
    # AllenNLP: `if clip_value: torch.clamp(...)`, i.e. None and 0 mean "no clip"; we also skip < 0.
    if value is None or value <= 0:
        return x
    return torch.clamp(x, -value, value)


def lstm_projection(x: torch.Tensor, lengths: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                    bias: Optional[torch.Tensor], w_proj: Optional[torch.Tensor], h0: torch.Tensor,
                    c0: torch.Tensor, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None,
                    reverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer, one direction of AllenNLP's `LstmCellWithProjection` (spec §5.1-5.2).

    x: (B, T, I); lengths: (B,) integer, each in 0..T (rows right-padded); w_ih: (4n, I);
    w_hh: (4n, P); bias: (4n,) or None; w_proj: (P, n) or None (plain LSTM, P = n);
    h0: (B, P); c0: (B, n). Gate blocks [i, f, j, o], the +1 forget bias already inside `bias`.
    Returns out (B, T, P) (zero at t >= lengths[b]), h_n (B, P), c_n (B, n): the state after each
    row's last processed step (h0 / c0 for rows of length 0).

    AllenNLP's per-step algorithm: a loop over time with both GEMMs inside it. Forward visits
    t = 0..T-1, reverse visits t = T-1..0; at step t only rows with lengths > t advance, so every row
    runs over exactly its own positions (reverse starts at each row's own last position). AllenNLP
    slices the active prefix of a length-sorted batch; here the inactive rows are held by a `where`,
    which computes the same values without sorting.
    """
    batch, steps, _ = x.shape
    n = c0.shape[-1]
    h, c = h0, c0
    lengths = lengths.to(device=x.device, dtype=torch.long)
    outputs: List[Optional[torch.Tensor]] = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        z = torch.nn.functional.linear(x[:, t], w_ih) + torch.nn.functional.linear(h, w_hh, bias)  # (B, 4n)
        i_gate = torch.sigmoid(z[:, 0 * n:1 * n])
        f_gate = torch.sigmoid(z[:, 1 * n:2 * n])
        j_cand = torch.tanh(z[:, 2 * n:3 * n])
        o_gate = torch.sigmoid(z[:, 3 * n:4 * n])
        c_new = _clip(i_gate * j_cand + f_gate * c, cell_clip)           # clip c before tanh(c)
        h_new = o_gate * torch.tanh(c_new)
        if w_proj is not None:
            h_new = torch.nn.functional.linear(h_new, w_proj)
        h_new = _clip(h_new, proj_clip)                                   # clip h after the projection
        active = (lengths > t).unsqueeze(1)                               # (B, 1)
        h = torch.where(active, h_new, h)
        c = torch.where(active, c_new, c)
        outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    if steps == 0:
        out = x.new_zeros(batch, 0, h0.shape[-1])
    else:
        out = torch.stack(outputs, dim=1)  # type: ignore[arg-type]
    return out, h, c


# --------------------------------------------------------------------------------------------------
# Whole-model reference: pure functions over an AllenNLP `_ElmoBiLm` state dict
# (the keys of elmo_fast.weights.load_weights) and the options dict. Loops, no cleverness.
# --------------------------------------------------------------------------------------------------

# +1-shifted char ids of "<S>" and "</S>" (spec §3.1): [begin-word, BOS/EOS char, end-word, pad-char x 47].
BOS_CHAR_IDS = [259, 257, 260] + [261] * 47
EOS_CHAR_IDS = [259, 258, 260] + [261] * 47


def add_sentence_boundaries(char_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AllenNLP `add_sentence_boundary_token_ids` for char ids (spec §4.1).

    char_ids: (B, T, 50) without boundaries, right-padded with all-zero tokens.
    Returns ids (B, T + 2, 50) with `<S>` at 0 and `</S>` at len_b + 1, and mask (B, T + 2) bool.
    """
    batch, steps, chars = char_ids.shape
    lengths = (char_ids > 0).any(dim=-1).sum(dim=-1)
    out = char_ids.new_zeros(batch, steps + 2, chars)
    out[:, 1:steps + 1] = char_ids
    for b in range(batch):
        out[b, 0] = torch.tensor(BOS_CHAR_IDS, dtype=out.dtype)
        out[b, int(lengths[b]) + 1] = torch.tensor(EOS_CHAR_IDS, dtype=out.dtype)
    return out, (out > 0).any(dim=-1)


def remove_sentence_boundaries(x: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """AllenNLP `remove_sentence_boundaries` (spec §6.2 step 4).

    x: (B, T + 2, D); mask: (B, T + 2). Returns (B, T, D) and mask (B, T) bool: row b keeps input
    positions 1..len_b - 2 at 0..len_b - 3; rows with len_b <= 2 are all zero / False.
    """
    batch, steps2, dim = x.shape
    out = x.new_zeros(batch, steps2 - 2, dim)
    new_mask = torch.zeros(batch, steps2 - 2, dtype=torch.bool, device=x.device)
    for b in range(batch):
        length = int(mask[b].sum())
        if length > 2:
            out[b, :length - 2] = x[b, 1:length - 1]
            new_mask[b, :length - 2] = True
    return out, new_mask


def char_encoder(char_ids: torch.Tensor, state: Dict[str, torch.Tensor], options: Dict) -> torch.Tensor:
    """Context-independent token vectors (spec §4.2): char-CNN, highways, projection.

    char_ids: (B, T, 50) (boundaries already in place, if wanted); state: `_ElmoBiLm` state dict;
    options: the options dict. Returns (B, T, P); whole padding tokens get the (non-zero) vector
    of an all-zero id row, as in AllenNLP.
    """
    batch, steps, chars = char_ids.shape
    prefix = "_token_embedder."
    n_filters = len(options["char_cnn"]["filters"])
    n_highway = options["char_cnn"].get("n_highway") or 0
    x = char_cnn(char_ids.reshape(batch * steps, chars), state[prefix + "_char_embedding_weights"],
                 [state[f"{prefix}char_conv_{i}.weight"] for i in range(n_filters)],
                 [state[f"{prefix}char_conv_{i}.bias"] for i in range(n_filters)],
                 options["char_cnn"]["activation"])
    x = highway(x, [state[f"{prefix}_highways._layers.{k}.weight"] for k in range(n_highway)],
                [state[f"{prefix}_highways._layers.{k}.bias"] for k in range(n_highway)])
    x = torch.nn.functional.linear(x, state[prefix + "_projection.weight"], state[prefix + "_projection.bias"])
    return x.reshape(batch, steps, x.shape[-1])  # not -1: ambiguous when batch * steps == 0


def elmo_lstm(x: torch.Tensor, lengths: torch.Tensor, state: Dict[str, torch.Tensor], options: Dict,
              h0: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None
              ) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """AllenNLP's `ElmoLstm` stack (spec §5.3): independent forward / backward stacks, skip
    connections (added to the output only) on layers >= 1.

    x: (B, T, P); lengths: (B,); h0: (L, B, 2P) and c0: (L, B, 2n), forward | backward halves
    (None = zeros). Returns ([layer outputs (B, T, 2P)] * L, h_n (L, B, 2P), c_n (L, B, 2n)).
    """
    lstm = options["lstm"]
    n_layers, n, p = lstm["n_layers"], lstm["dim"], lstm["projection_dim"]
    batch = x.shape[0]
    if h0 is None:
        h0 = x.new_zeros(n_layers, batch, 2 * p)
    if c0 is None:
        c0 = x.new_zeros(n_layers, batch, 2 * n)
    outputs, h_n, c_n = [], [], []
    in_fwd = in_bwd = x
    for layer in range(n_layers):
        results = []
        for direction, inputs in (("forward", in_fwd), ("backward", in_bwd)):
            key = f"_elmo_lstm.{direction}_layer_{layer}."
            half = slice(0, p) if direction == "forward" else slice(p, 2 * p)
            half_c = slice(0, n) if direction == "forward" else slice(n, 2 * n)
            out, h, c = lstm_projection(inputs, lengths, state[key + "input_linearity.weight"],
                                        state[key + "state_linearity.weight"], state[key + "state_linearity.bias"],
                                        state[key + "state_projection.weight"], h0[layer, :, half],
                                        c0[layer, :, half_c], lstm["cell_clip"], lstm["proj_clip"],
                                        reverse=direction == "backward")
            if layer > 0:
                out = out + inputs
            results.append((out, h, c))
        (o_f, h_f, c_f), (o_b, h_b, c_b) = results
        outputs.append(torch.cat([o_f, o_b], dim=-1))
        h_n.append(torch.cat([h_f, h_b], dim=-1))
        c_n.append(torch.cat([c_f, c_b], dim=-1))
        in_fwd, in_bwd = o_f, o_b
    if n_layers == 0:
        return [], h0, c0
    return outputs, torch.stack(h_n), torch.stack(c_n)


def elmo_bilm(char_ids: torch.Tensor, state: Dict[str, torch.Tensor], options: Dict,
              h0: Optional[torch.Tensor] = None, c0: Optional[torch.Tensor] = None
              ) -> Tuple[List[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """AllenNLP's `_ElmoBiLm.forward` (spec §6.1) as a pure function.

    char_ids: (B, T, 50) without boundaries. Returns (activations [A_0 .. A_L] each (B, T + 2, 2P),
    mask (B, T + 2) bool, h_n (L, B, 2P), c_n (L, B, 2n)); A_0 = concat(tok, tok) * mask.
    """
    ids, mask = add_sentence_boundaries(char_ids)
    tok = char_encoder(ids, state, options)
    lengths = mask.sum(dim=-1)
    layers, h_n, c_n = elmo_lstm(tok, lengths, state, options, h0, c0)
    a0 = torch.cat([tok, tok], dim=-1) * mask.unsqueeze(-1).to(tok.dtype)
    return [a0] + layers, mask, h_n, c_n


def scalar_mix(tensors: Sequence[torch.Tensor], mask: torch.Tensor, scalar_parameters: Sequence[float],
               gamma: float = 1.0, do_layer_norm: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """AllenNLP 0.9 `ScalarMix.forward` (spec §6.2 step 3): gamma * sum_j softmax(w)_j * N(A_j).

    tensors: L + 1 tensors (B, T, D); mask: (B, T). With do_layer_norm, N(A) = (A - mean) /
    sqrt(var + eps) with one scalar mean / variance per layer over all unmasked elements.
    """
    weights = torch.softmax(torch.tensor([float(w) for w in scalar_parameters], dtype=torch.float64), dim=0)
    total = None
    for weight, tensor in zip(weights.tolist(), tensors):
        if do_layer_norm:
            m = mask.to(tensor.dtype).unsqueeze(-1)
            count = mask.to(tensor.dtype).sum() * tensor.shape[-1]
            mean = (tensor * m).sum() / count
            var = (((tensor * m - mean) * m) ** 2).sum() / count
            tensor = (tensor - mean) / torch.sqrt(var + eps)
        piece = weight * tensor
        total = piece if total is None else total + piece
    return gamma * total
