"""Loads the extension and registers, for every op of torch.ops.elmo_fast, its fake (meta)
implementation and its autograd formula. Nothing else: argument checks live in functional.py."""
import torch

from elmo_fast._loader import load_extension

_C = load_extension()


# --- highway ---------------------------------------------------------------------------------

@torch.library.register_fake("elmo_fast::highway")
def _highway_fake(x, weight, bias, save_activations):
    n, f = x.shape
    activations = x.new_empty((len(weight), n, 2 * f)) if save_activations else x.new_empty((0,))
    return x.new_empty((n, f)), activations


@torch.library.register_fake("elmo_fast::highway_backward")
def _highway_backward_fake(grad_out, x, activations, weight):
    return x.new_empty(x.shape), [w.new_empty(w.shape) for w in weight], [w.new_empty(w.shape[:1]) for w in weight]


def _highway_setup_context(ctx, inputs, output):
    x, weight, _bias, _save = inputs
    ctx.num_layers = len(weight)
    ctx.save_for_backward(x, output[1], *weight)


def _highway_backward(ctx, grad_out, _grad_activations):
    x, activations, *weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    grad_x, grad_weight, grad_bias = torch.ops.elmo_fast.highway_backward(grad_out, x, activations, weight)
    return grad_x, list(grad_weight), list(grad_bias), None


torch.library.register_autograd("elmo_fast::highway", _highway_backward, setup_context=_highway_setup_context)
