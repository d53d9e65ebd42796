"""Replaying a fixed-shape CUDA computation from captured graphs (ELMO_FAST_CUDA_GRAPHS).

Note [CUDA graphs]
The stepwise LSTM launches ~4 kernels per step, layer and direction (~550 for ELMo's biLM at 34
steps), each costing host time on the order of the GPU time of its small GEMM, so at inference
batch sizes the host, not the GPU, sets the pace. A captured graph replays all of them with one
launch. What a graph bakes in is the key: tensor shapes, dtype, device, the lengths (they decide the
host-side plan of every step) and the parameters' addresses (in-place updates are seen; new
parameter tensors mean a new key). Capturing costs about two plain calls (torch's recipe: one
warm-up on a side stream, then the capture), so graphs pay only when keys repeat: benchmarks,
fixed-size batches, bucketed corpora. Each graph keeps its own memory pool, so at most
`capacity` graphs are kept, least recently used first out.
"""
from collections import OrderedDict
from typing import Callable, Hashable, List, Sequence

import torch


def enabled() -> bool:
    """Whether ELMO_FAST_CUDA_GRAPHS (or elmo_fast.set_kernel("cuda_graphs", ...)) asks for graphs."""
    return bool(torch.ops.elmo_fast._kernel_chosen("cuda_graphs", "on"))


class GraphCache:
    """cache(key, fn, *tensors) = fn(*tensors) (a sequence of tensors), replayed from the graph
    captured for `key` (fn is called only to capture: it must compute the same thing for a key).

    Calls return fresh tensors (copies of the graph's outputs), so results of earlier calls stay
    valid after later replays. Not for autograd: capture and replay run without grad.
    """

    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._graphs: "OrderedDict[Hashable, tuple]" = OrderedDict()
        self.captures = 0  # for tests and benchmarks: how many graphs were captured so far

    def __len__(self) -> int:
        return len(self._graphs)

    def clear(self) -> None:
        self._graphs.clear()

    def __call__(self, key: Hashable, fn: Callable[..., Sequence[torch.Tensor]],
                 *tensors: torch.Tensor) -> List[torch.Tensor]:
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(fn, tensors)
            self._graphs[key] = entry
            while len(self._graphs) > self.capacity:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for buffer, value in zip(static_in, tensors):
            buffer.copy_(value)
        graph.replay()
        return [t.clone() for t in static_out]

    def _capture(self, fn: Callable[..., Sequence[torch.Tensor]], tensors: Sequence[torch.Tensor]) -> tuple:
        static_in = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            side = torch.cuda.Stream(device=static_in[0].device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: cuBLAS handles and workspaces exist before capture
                fn(*static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = list(fn(*static_in))
        self.captures += 1
        return graph, static_in, static_out
