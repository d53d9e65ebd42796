"""Loads the extension and registers, for every op of torch.ops.elmo_fast, its fake (meta)
implementation and its autograd formula. Nothing else: argument checks live in functional.py."""
import functools

import torch

from elmo_fast._loader import load_extension

_C = load_extension()


def _first_order_only(op):
    """Marks an op's gradients as not differentiable. The *_backward ops have no autograd formula of
    their own, so under create_graph=True (a gradient penalty) autograd would record only part of them
    and a second derivative would come out silently wrong (found by scripts/fuzz_ops.py). As with
    torch.autograd.function.once_differentiable: the backward runs without recording, and its outputs
    raise a clear error if anything differentiates them."""
    message = (f"elmo_fast::{op}: double backward (differentiating its gradients, create_graph=True) is not "
               "supported (first derivatives are)").encode()

    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():  # plain backward: nothing is recorded
                return backward(ctx, *grads)
            # A zero that depends on every differentiable input of this backward: the error node hangs on
            # it, so autograd.grad(..., inputs) reaches the node (and raises) instead of pruning it away.
            sources = [t for t in (*ctx.saved_tensors, *grads)
                       if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
            anchor = sum(t.reshape(-1)[:0].sum() for t in sources) if sources else None
            with torch.no_grad():
                result = backward(ctx, *grads)
            if anchor is None:
                return result

            def poison(g):
                if isinstance(g, (list, tuple)):
                    return type(g)(poison(t) for t in g)
                if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                    return g
                return torch._C._functions.DelayedError(message, 1)(g + anchor.to(g.dtype))

            return tuple(poison(g) for g in result)
        return wrapper
    return wrap


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


@_first_order_only("highway")
def _highway_backward(ctx, grad_out, _grad_activations):
    x, activations, *weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    grad_x, grad_weight, grad_bias = torch.ops.elmo_fast.highway_backward(grad_out, x, activations, weight)
    return grad_x, list(grad_weight), list(grad_bias), None


torch.library.register_autograd("elmo_fast::highway", _highway_backward, setup_context=_highway_setup_context)


# --- lstm_projection -------------------------------------------------------------------------

def _acc_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("elmo_fast::lstm_projection")
def _lstm_projection_fake(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, reverse,
                          save_activations):
    b, t, _ = x.shape
    n, p = c0.shape[1], h0.shape[1]
    size = b * t * 5 * n if save_activations else 0  # layout: csrc/common/lstm_driver.h
    return (x.new_empty((b, t, p)), h0.new_empty((b, p)), c0.new_empty((b, n)),
            x.new_empty((size,), dtype=_acc_dtype(x.dtype)))


@torch.library.register_fake("elmo_fast::lstm_projection_backward")
def _lstm_projection_backward_fake(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out,
                                   activations, has_bias, cell_clip, proj_clip, reverse):
    n = c0.shape[1]
    return (x.new_empty(x.shape), w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
            x.new_empty((4 * n,) if has_bias else (0,)),
            w_proj.new_empty(w_proj.shape) if w_proj is not None else x.new_empty((0,)),
            h0.new_empty(h0.shape), c0.new_empty(c0.shape))


def _lstm_projection_setup_context(ctx, inputs, output):
    x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, reverse, save = inputs
    ctx.has_bias, ctx.has_proj, ctx.saved_activations = bias is not None, w_proj is not None, save
    ctx.clips_reverse = (cell_clip, proj_clip, reverse)
    # The gates are saved activated, so backward reads the bias only to recompute unsaved activations.
    ctx.save_for_backward(x, lengths, w_ih, w_hh, w_proj, h0, c0, output[0], output[3], None if save else bias)


@_first_order_only("lstm_projection")
def _lstm_projection_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_activations):
    x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations, bias = ctx.saved_tensors
    cell_clip, proj_clip, reverse = ctx.clips_reverse
    if not ctx.saved_activations:  # called with save_activations=False: recompute them
        out, _, _, activations = torch.ops.elmo_fast.lstm_projection(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0,
                                                                     cell_clip, proj_clip, reverse, True)
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(c0) if grad_c_n is None else grad_c_n
    gx, gw_ih, gw_hh, gb, gw_proj, gh0, gc0 = torch.ops.elmo_fast.lstm_projection_backward(
        grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out, activations, ctx.has_bias,
        cell_clip, proj_clip, reverse)
    return (gx, None, gw_ih, gw_hh, gb if ctx.has_bias else None, gw_proj if ctx.has_proj else None, gh0, gc0,
            None, None, None, None)


torch.library.register_autograd("elmo_fast::lstm_projection", _lstm_projection_backward,
                                setup_context=_lstm_projection_setup_context)

# --- lstm_bidirectional: both directions of a layer; every list is [forward, reverse] ------------

@torch.library.register_fake("elmo_fast::lstm_bidirectional")
def _lstm_bidirectional_fake(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, save_activations):
    per_direction = [_lstm_projection_fake(x[i], lengths, w_ih[i], w_hh[i], bias[i], w_proj[i], h0[i], c0[i],
                                           cell_clip, proj_clip, i == 1, save_activations) for i in range(2)]
    return tuple([d[k] for d in per_direction] for k in range(4))


@torch.library.register_fake("elmo_fast::lstm_bidirectional_backward")
def _lstm_bidirectional_backward_fake(grad_out, grad_h_n, grad_c_n, x, lengths, w_ih, w_hh, w_proj, h0, c0, out,
                                      activations, has_bias, cell_clip, proj_clip):
    per_direction = [_lstm_projection_backward_fake(grad_out[i], grad_h_n[i], grad_c_n[i], x[i], lengths, w_ih[i],
                                                    w_hh[i], w_proj[i], h0[i], c0[i], out[i], activations[i],
                                                    has_bias, cell_clip, proj_clip, i == 1) for i in range(2)]
    return tuple([d[k] for d in per_direction] for k in range(7))


@torch.library.register_fake("elmo_fast::_lstm_chains")
def _lstm_chains_fake(x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, reverse, cell_clip, proj_clip):
    """Independent inference chains (Note [wavefront] in elmo_fast/wavefront.py): out, h_n, c_n each."""
    per_chain = [_lstm_projection_fake(x[i], lengths[i], w_ih[i], w_hh[i], bias[i], w_proj[i], h0[i], c0[i],
                                       cell_clip, proj_clip, reverse[i], False) for i in range(len(x))]
    return tuple([c[k] for c in per_chain] for k in range(3))


def _lstm_bidirectional_setup_context(ctx, inputs, output):
    x, lengths, w_ih, w_hh, bias, w_proj, h0, c0, cell_clip, proj_clip, save = inputs
    ctx.has_bias = [b is not None for b in bias]
    ctx.has_proj = [w is not None for w in w_proj]
    ctx.saved_activations, ctx.clips = save, (cell_clip, proj_clip)
    ctx.save_for_backward(lengths, *x, *w_ih, *w_hh, *w_proj, *h0, *c0, *output[0], *output[3],
                          *((None, None) if save else bias))


@_first_order_only("lstm_bidirectional")
def _lstm_bidirectional_backward(ctx, grad_out, grad_h_n, grad_c_n, _grad_activations):
    lengths, *rest = ctx.saved_tensors
    x, w_ih, w_hh, w_proj, h0, c0, out, activations, bias = (rest[k:k + 2] for k in range(0, 18, 2))
    cell_clip, proj_clip = ctx.clips
    if not ctx.saved_activations:  # called with save_activations=False: recompute them
        out, _, _, activations = torch.ops.elmo_fast.lstm_bidirectional(x, lengths, w_ih, w_hh, bias, w_proj, h0,
                                                                        c0, cell_clip, proj_clip, True)

    def or_zeros(grads, like):
        return [torch.zeros_like(t) if g is None else g for g, t in zip(grads or (None, None), like)]

    gx, gw_ih, gw_hh, gb, gw_proj, gh0, gc0 = torch.ops.elmo_fast.lstm_bidirectional_backward(
        or_zeros(grad_out, out), or_zeros(grad_h_n, h0), or_zeros(grad_c_n, c0), x, lengths, w_ih, w_hh, w_proj, h0,
        c0, out, activations, any(ctx.has_bias), cell_clip, proj_clip)
    # torch.library treats a Tensor?[] holding a None as one non-tensor argument: its grad is None.
    gb = list(gb) if all(ctx.has_bias) else None
    gw_proj = list(gw_proj) if all(ctx.has_proj) else None
    return list(gx), None, list(gw_ih), list(gw_hh), gb, gw_proj, list(gh0), list(gc0), None, None, None


torch.library.register_autograd("elmo_fast::lstm_bidirectional", _lstm_bidirectional_backward,
                                setup_context=_lstm_bidirectional_setup_context)

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


@_first_order_only("char_cnn")
def _char_cnn_backward(ctx, grad_out, _grad_windows):
    char_ids, embedding, out, windows, *weight = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_embedding, grad_weight, grad_bias = torch.ops.elmo_fast.char_cnn_backward(
        grad_out, char_ids, embedding, weight, out, windows, ctx.activation)
    return None, grad_embedding, list(grad_weight), list(grad_bias), None, None


torch.library.register_autograd("elmo_fast::char_cnn", _char_cnn_backward, setup_context=_char_cnn_setup_context)

# --- autocast --------------------------------------------------------------------------------
# Under torch.autocast("cpu") the forward ops run in bfloat16 (CPU autocast's dtype; the only low
# precision the CPU ops take): floating inputs, weight lists included, are cast to bf16 (the casts
# are recorded by autograd, so float32 parameters get float32 gradients) and the outputs are bf16.
# The backward ops need no rule: autograd calls them with the forward's bf16 tensors.
for _name in ("highway", "lstm_projection", "lstm_bidirectional", "char_cnn"):
    torch.library.register_autocast(f"elmo_fast::{_name}", "cpu", torch.bfloat16)
