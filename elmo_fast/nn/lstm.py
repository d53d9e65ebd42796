"""LSTM modules on the fused lstm_projection op: `LSTM`, a torch.nn.LSTM drop-in (same arguments,
parameter names, shapes and PackedSequence handling, plus keyword-only clips), and AllenNLP's
`LstmCellWithProjection` (its parameter names). torch's gate order [i, f, g, o] is AllenNLP's
[i, f, j, o], so weights are used as they are."""
import math
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from elmo_fast import functional as F
from elmo_fast import wavefront

__all__ = ["LSTM", "LstmCellWithProjection"]


# PackedSequence conversions run outside torch.compile's graph (a graph break, where newer torch makes
# anyway): torch 2.11's dynamo traces pad_packed_sequence with fake tensors and fails.
@torch.compiler.disable
def _unpack(input: PackedSequence):
    return pad_packed_sequence(input, batch_first=True)


@torch.compiler.disable
def _packed_data(padded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=True).data


class LSTM(nn.Module):
    """torch.nn.LSTM on elmo_fast's fused op. Same constructor, `forward(input, hx=None)` and results:
    input (T, B, I) or (B, T, I) with batch_first, (T, I) unbatched, or a PackedSequence; hx = (h_0, c_0)
    of shapes (L * D, B, P or H) and (L * D, B, H). Extra keyword-only `cell_clip` and `proj_clip`
    (None = none) clip the cell state and the (projected) hidden state every step, as ELMo does.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, cell_clip: Optional[float] = None, proj_clip: Optional[float] = None):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if proj_size < 0 or (proj_size >= hidden_size and proj_size != 0):
            raise ValueError(f"proj_size must be 0 or in [1, hidden_size), got {proj_size}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.cell_clip, self.proj_clip = cell_clip, proj_clip
        kw = dict(device=device, dtype=dtype)
        out_size = proj_size or hidden_size
        self._names: List[List[str]] = []  # per (layer, direction): its parameter names
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else out_size * self.num_directions
            for direction in range(self.num_directions):
                sfx = f"_l{layer}" + ("_reverse" if direction else "")
                names = [f"weight_ih{sfx}", f"weight_hh{sfx}"]
                setattr(self, names[0], nn.Parameter(torch.empty(4 * hidden_size, layer_in, **kw)))
                setattr(self, names[1], nn.Parameter(torch.empty(4 * hidden_size, out_size, **kw)))
                if bias:
                    names += [f"bias_ih{sfx}", f"bias_hh{sfx}"]
                    setattr(self, names[2], nn.Parameter(torch.empty(4 * hidden_size, **kw)))
                    setattr(self, names[3], nn.Parameter(torch.empty(4 * hidden_size, **kw)))
                if proj_size:
                    names.append(f"weight_hr{sfx}")
                    setattr(self, names[-1], nn.Parameter(torch.empty(proj_size, hidden_size, **kw)))
                self._names.append(names)
        self.reset_parameters()

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # torch.nn.LSTM's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def _weights(self, index: int):
        names = self._names[index]
        w_ih, w_hh = getattr(self, names[0]), getattr(self, names[1])
        bias = getattr(self, names[2]) + getattr(self, names[3]) if self.bias else None
        w_proj = getattr(self, names[-1]) if self.proj_size else None
        return w_ih, w_hh, bias, w_proj

    def forward(self, input, hx: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            x, lengths = _unpack(input)  # original row order
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: expected input to be 2-D or 3-D, got {input.dim()}-D")
            unbatched = input.dim() == 2
            x = input.unsqueeze(0 if self.batch_first else 1) if unbatched else input
            x = x if self.batch_first else x.transpose(0, 1)
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"LSTM: input has {x.shape[-1]} features, expected input_size={self.input_size}")
        lengths = lengths.to(device="cpu", dtype=torch.int64)
        B = x.shape[0]
        out_size, L, D = self.proj_size or self.hidden_size, self.num_layers, self.num_directions
        if hx is None:
            h0 = x.new_zeros(L * D, B, out_size)
            c0 = x.new_zeros(L * D, B, self.hidden_size)
        else:
            h0, c0 = hx
            if unbatched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            if tuple(h0.shape) != (L * D, B, out_size):
                raise ValueError(f"LSTM: h_0 must have shape {(L * D, B, out_size)}, got {tuple(h0.shape)}")
            if tuple(c0.shape) != (L * D, B, self.hidden_size):
                raise ValueError(f"LSTM: c_0 must have shape {(L * D, B, self.hidden_size)}, got {tuple(c0.shape)}")

        def layer_by_layer():
            h_n, c_n = [], []
            layer_in = x
            for layer in range(L):
                k = layer * D
                if D == 1:
                    out, h, c = F.lstm_projection(layer_in, lengths, *self._weights(k), h0[k], c0[k], self.cell_clip,
                                                  self.proj_clip)
                    outs, hs, cs = [out], [h], [c]
                else:  # one op for both directions, so the CPU may run them side by side
                    outs, hs, cs = F.lstm_bidirectional(layer_in, lengths, [self._weights(k), self._weights(k + 1)],
                                                        [h0[k], h0[k + 1]], [c0[k], c0[k + 1]], self.cell_clip,
                                                        self.proj_clip)
                h_n += hs
                c_n += cs
                layer_in = outs[0] if D == 1 else torch.cat(outs, dim=-1)
                if self.dropout > 0 and self.training and layer < L - 1:
                    layer_in = nn.functional.dropout(layer_in, self.dropout, training=True)
            return layer_in, torch.stack(h_n), torch.stack(c_n)

        if wavefront.lstm_applies(self, x, h0, c0):  # many-core CPU inference (Note [wavefront])
            layer_in, h_n, c_n = wavefront.run_lstm(self, x, lengths, h0, c0, layer_by_layer)
        else:
            layer_in, h_n, c_n = layer_by_layer()
        if packed:
            sorted_out = layer_in.index_select(0, input.sorted_indices) if input.sorted_indices is not None \
                else layer_in
            sorted_len = lengths.index_select(0, input.sorted_indices.cpu()) if input.sorted_indices is not None \
                else lengths
            data = _packed_data(sorted_out, sorted_len)
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
        out = layer_in if self.batch_first else layer_in.transpose(0, 1)
        if unbatched:
            out, h_n, c_n = out.squeeze(0 if self.batch_first else 1), h_n.squeeze(1), c_n.squeeze(1)
        return out, (h_n, c_n)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}"
        s += f", batch_first={self.batch_first}, dropout={self.dropout}, bidirectional={self.bidirectional}"
        s += f", proj_size={self.proj_size}, cell_clip={self.cell_clip}, proj_clip={self.proj_clip}"
        return s


class LstmCellWithProjection(nn.Module):
    """AllenNLP's `LstmCellWithProjection` (one layer, one direction) on the fused op, with its
    parameter names: input_linearity (4C, I, no bias), state_linearity (4C, H, bias; +1 forget bias
    at init), state_projection (H, C, no bias). forward(inputs (B, T, I), batch_lengths, initial_state
    = (h (1, B, H), c (1, B, C)) or None) -> (output (B, T, H), (h_n (1, B, H), c_n (1, B, C))).
    Rows need not be sorted by length. Only recurrent_dropout_probability = 0 is supported (ELMo's).
    """

    def __init__(self, input_size: int, hidden_size: int, cell_size: int, go_forward: bool = True,
                 recurrent_dropout_probability: float = 0.0, memory_cell_clip_value: Optional[float] = None,
                 state_projection_clip_value: Optional[float] = None):
        super().__init__()
        if recurrent_dropout_probability != 0.0:
            raise ValueError("LstmCellWithProjection: only recurrent_dropout_probability=0 is supported")
        self.input_size, self.hidden_size, self.cell_size = input_size, hidden_size, cell_size
        self.go_forward = go_forward
        self.recurrent_dropout_probability = recurrent_dropout_probability
        self.memory_cell_clip_value = memory_cell_clip_value
        self.state_projection_clip_value = state_projection_clip_value
        self.input_linearity = nn.Linear(input_size, 4 * cell_size, bias=False)
        self.state_linearity = nn.Linear(hidden_size, 4 * cell_size, bias=True)
        self.state_projection = nn.Linear(cell_size, hidden_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # AllenNLP: block-orthogonal weights, zero bias with the forget gate's block at 1.
        if self.state_linearity.weight.is_meta:
            return  # built on the meta device to be filled by load_state_dict(assign=True)
        for linear in (self.input_linearity, self.state_linearity):
            with torch.no_grad():
                for block in linear.weight.split(self.cell_size, dim=0):
                    nn.init.orthogonal_(block)
        with torch.no_grad():
            self.state_linearity.bias.zero_()
            self.state_linearity.bias[self.cell_size:2 * self.cell_size] = 1.0

    def weights(self):
        """(w_ih, w_hh, bias, w_proj) in lstm_projection's order."""
        return (self.input_linearity.weight, self.state_linearity.weight, self.state_linearity.bias,
                self.state_projection.weight)

    def forward(self, inputs: torch.Tensor, batch_lengths, initial_state=None):
        B = inputs.shape[0]
        lengths = torch.as_tensor(batch_lengths, dtype=torch.int64, device="cpu")
        if initial_state is None:
            h0 = inputs.new_zeros(B, self.hidden_size)
            c0 = inputs.new_zeros(B, self.cell_size)
        else:
            h0, c0 = initial_state[0].squeeze(0).contiguous(), initial_state[1].squeeze(0).contiguous()
        out, h, c = F.lstm_projection(inputs, lengths, *self.weights(), h0, c0, self.memory_cell_clip_value,
                                      self.state_projection_clip_value, reverse=not self.go_forward)
        return out, (h.unsqueeze(0), c.unsqueeze(0))
