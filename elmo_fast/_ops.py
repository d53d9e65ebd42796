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


# --- char_cnn --------------------------------------------------------------------------------

@torch.library.register_fake("elmo_fast::char_cnn")
def _char_cnn_fake(char_ids, embedding, weight, bias, activation, save_activations):
    n, f = char_ids.shape[0], sum(w.shape[0] for w in weight)
    windows = char_ids.new_empty((n, f) if save_activations else (0, 0), dtype=torch.int16)
    return embedding.new_empty((n, f)), windows


@torch.library.register_fake("elmo_fast::char_cnn_backward")
def _char_cnn_backward_fake(grad_out, char_ids, embedding, weight, out, windows, activation):
    return (embedding.new_empty(embedding.shape), [w.new_empty(w.shape) for w in weight],
            [w.new_empty(w.shape[:1]) for w in weight])


def _char_cnn_setup_context(ctx, inputs, output):
    char_ids, embedding, weight, _bias, activation, _save = inputs
    ctx.activation = activation
    ctx.save_for_backward(char_ids, embedding, output[0], output[1], *weight)


def _char_cnn_backward(ctx, grad_out, _grad_windows):
    char_ids, embedding, out, windows, *weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_embedding, grad_weight, grad_bias = torch.ops.elmo_fast.char_cnn_backward(
        grad_out, char_ids, embedding, weight, out, windows, ctx.activation)
    return None, grad_embedding, list(grad_weight), list(grad_bias), None, None


torch.library.register_autograd("elmo_fast::char_cnn", _char_cnn_backward, setup_context=_char_cnn_setup_context)
