"""The sliced loss gives the plain cross-entropy's value and gradients while keeping no vocabulary-sized tensor for the
backward pass."""

from __future__ import annotations

import pytest

from app.core.loss import head_cross_entropy, loss_chunk_tokens

VOCAB, HIDDEN, TOKENS = 300, 16, 10


def head_and_inputs(trainable_head: bool = False):
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    head.weight.requires_grad_(trainable_head)
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (TOKENS,))
    return head, hidden, targets


def plain_loss(head, hidden, targets, softcap=None):
    import torch
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 3, TOKENS, 64])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_value_and_gradient_match_the_plain_loss(chunk, softcap):
    import torch

    head, hidden, targets = head_and_inputs()
    expected = plain_loss(head, hidden, targets, softcap)
    (expected * 0.37).backward()  # a scaled loss, as the trainer divides by the step's tokens
    expected_grad = hidden.grad.clone()
    hidden.grad = None

    loss = head_cross_entropy(head, hidden, targets, softcap, chunk=chunk)
    (loss * 0.37).backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(hidden.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_without_gradients_it_only_measures():
    import torch

    head, hidden, targets = head_and_inputs()
    with torch.no_grad():
        loss = head_cross_entropy(head, hidden, targets, chunk=4)
    assert not loss.requires_grad
    assert torch.allclose(loss, plain_loss(head, hidden, targets).detach(), rtol=1e-6)


class Saved:
    """A tensor autograd saved for the backward pass; alive for as long as a graph still needs it."""

    def __init__(self, tensor):
        self.tensor = tensor


def bytes_kept_for_backward(compute_loss) -> int:
    """The bytes of the tensors the loss's graph still holds once it is computed (transient ones not counted)."""
    import gc
    import weakref

    import torch

    saved = weakref.WeakSet()

    def pack(tensor):
        box = Saved(tensor)
        saved.add(box)
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        loss = compute_loss()
    gc.collect()
    kept = sum(box.tensor.numel() * box.tensor.element_size() for box in saved)
    del loss
    return kept


def test_the_backward_keeps_hidden_sized_tensors_not_logits():
    head, hidden, targets = head_and_inputs()
    assert bytes_kept_for_backward(lambda: plain_loss(head, hidden, targets)) >= TOKENS * VOCAB * 4, \
        "the plain loss keeps its logits (so the check can tell)"
    assert bytes_kept_for_backward(lambda: head_cross_entropy(head, hidden, targets, chunk=4)) <= TOKENS * HIDDEN * 4


def test_a_trainable_head_still_gets_its_gradient():
    head, hidden, targets = head_and_inputs(trainable_head=True)
    head_cross_entropy(head, hidden, targets, chunk=3).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_slices_are_sized_by_the_vocabulary():
    assert loss_chunk_tokens(49_152) == 341      # SmolLM2: a typical persona step's trained tokens in one or two slices
    assert loss_chunk_tokens(128_256) == 130     # Llama 3: a 1024-token example in eight
    assert loss_chunk_tokens(10**12) == 1
