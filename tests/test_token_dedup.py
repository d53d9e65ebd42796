"""Note [exact token dedup]: the char encoder encodes each distinct token once; the numbers and the
gradients must be those of encoding every token."""
import torch

from elmo_fast import reference as R
from elmo_fast.chars import batch_to_ids
from elmo_fast.elmo import ElmoCharacterEncoder
from elmo_fast.synthetic import write_elmo_files
from elmo_fast.weights import load_weights
from util import assert_close_verbose

SENTENCES = [["the", "cat", "sat", "on", "the", "mat", "."], ["the", "dog", "."], [], ["cat", "the", "cat"]]


def test_dedup_matches_every_token_forward_and_backward(tmp_path):
    files = write_elmo_files(tmp_path)
    encoder = ElmoCharacterEncoder(*files, requires_grad=True).double()
    ids = batch_to_ids(SENTENCES)
    boundary_ids, _ = R.add_sentence_boundaries(ids)
    flat = boundary_ids.reshape(-1, 50)
    assert torch.unique(flat, dim=0).shape[0] < flat.shape[0]  # the batch really repeats tokens

    deduped = encoder(ids)["token_embedding"].reshape(-1, encoder.get_output_dim())
    every = encoder.embed_ids(flat)
    assert_close_verbose(deduped, every, rtol=1e-12, atol=1e-12)

    grad = torch.randn_like(every)
    params = list(encoder.parameters())
    got = torch.autograd.grad(deduped, params, grad)
    want = torch.autograd.grad(every, params, grad)
    for g, w in zip(got, want):
        assert_close_verbose(g, w, rtol=1e-10, atol=1e-12)

    options, state = load_weights(*files, dtype=torch.float64)
    assert_close_verbose(deduped, R.char_encoder(boundary_ids, state, options).reshape(-1, deduped.shape[1]),
                         rtol=1e-9, atol=1e-10)
