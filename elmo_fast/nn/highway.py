"""Highway: AllenNLP's allennlp.modules.highway.Highway on the fused op."""
from typing import Callable

import torch

from elmo_fast import functional


class Highway(torch.nn.Module):
    """A stack of highway layers, AllenNLP's parameter names and initialisation.

    Parameters `_layers.{k}.weight` (2F, F) and `_layers.{k}.bias` (2F,), so an AllenNLP Highway's
    state_dict loads with strict=True. Forward: x (..., F) -> (..., F).
    Only activation=relu (ELMo's, and AllenNLP's default) runs on the fused op; another callable
    runs the same algorithm in plain PyTorch.
    """

    def __init__(self, input_dim: int, num_layers: int = 1,
                 activation: Callable[[torch.Tensor], torch.Tensor] = torch.nn.functional.relu) -> None:
        super().__init__()
        if int(input_dim) != input_dim or input_dim < 1:
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        if int(num_layers) != num_layers or num_layers < 0:
            raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}")
        self._input_dim = int(input_dim)
        self._activation = activation
        self._layers = torch.nn.ModuleList(
            [torch.nn.Linear(self._input_dim, 2 * self._input_dim) for _ in range(int(num_layers))])
        for layer in self._layers:
            # AllenNLP: bias the gate towards carrying the input at the start of training.
            layer.bias[self._input_dim:].data.fill_(1)

    def _fused(self) -> bool:
        return self._activation in (torch.nn.functional.relu, torch.relu)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 1 or inputs.shape[-1] != self._input_dim:
            raise ValueError(f"inputs must have shape (..., {self._input_dim}), got {tuple(inputs.shape)}")
        weights = [layer.weight for layer in self._layers]
        biases = [layer.bias for layer in self._layers]
        if not self._fused():
            x = inputs
            for w, b in zip(weights, biases):
                nonlinear, gate = torch.nn.functional.linear(x, w, b).chunk(2, dim=-1)
                gate = torch.sigmoid(gate)
                x = gate * x + (1 - gate) * self._activation(nonlinear)
            return x
        flat = inputs.reshape(-1, self._input_dim)
        return functional.highway(flat, weights, biases).reshape(inputs.shape)
