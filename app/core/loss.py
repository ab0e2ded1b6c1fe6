"""The training loss: cross-entropy of the output head over the trained tokens, a slice of tokens at a time.

A causal LM's loss builds tokens x vocabulary logits, and its backward keeps three fp32 values per logit alive at once
(the log-softmax, the gradient into it, the gradient of the logits). For Llama 3's 128k vocabulary that is 1.5 MB
per trained token: 1.1 GB for a 1024-token example, more than the adapter, its optimizer and every checkpointed
activation together. So the loss runs the head over LOSS_CHUNK_TOKENS tokens at a time and takes each slice's
gradient with respect to the hidden states at once, while its logits are alive; only that gradient (hidden-size, not
vocabulary-size) is kept for the backward pass, which scales it by the incoming gradient. Nothing is recomputed: the
work is the same as the unchunked loss's forward and backward, only in another order (Liger's and Unsloth's fused
linear cross-entropy do the same on GPUs with their own kernels).
"""

from __future__ import annotations

import functools

LOSS_CHUNK_BYTES = 64 * 2**20
"""fp32 logits per slice; the backward of a slice holds three times this."""


def loss_chunk_tokens(vocab_size: int) -> int:
    """Trained tokens per slice of the loss for this vocabulary (the memory estimate uses the same number)."""
    return max(1, LOSS_CHUNK_BYTES // (vocab_size * 4))


def _head_loss(head, hidden, targets, softcap: float | None):
    import torch
    import torch.nn.functional as F

    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@functools.cache
def _chunked_head_loss():
    """The autograd function, built on first use so importing this module does not import torch."""
    import torch

    class ChunkedHeadLoss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, targets, head, softcap, chunk):
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, hidden.shape[0], chunk):
                with torch.enable_grad():
                    piece = hidden[start:start + chunk].detach().requires_grad_(grad is not None)
                    loss = _head_loss(head, piece, targets[start:start + chunk], softcap)
                if grad is not None:
                    grad[start:start + chunk] = torch.autograd.grad(loss, piece)[0]
                total += loss.detach()
            ctx.save_for_backward(grad)
            return total

        @staticmethod
        def backward(ctx, grad_output):
            (grad,) = ctx.saved_tensors
            return grad * grad_output.to(grad.dtype), None, None, None, None

    return ChunkedHeadLoss


def head_cross_entropy(head, hidden, targets, softcap: float | None = None, chunk: int | None = None):
    """Summed cross-entropy of `head(hidden)` (rows: trained tokens) against `targets`, never holding more than
    `chunk` tokens' logits (default: loss_chunk_tokens of the head's vocabulary). A head with trainable weights is
    differentiated the ordinary way, since the chunked gradient is taken for the hidden states only."""
    if any(parameter.requires_grad for parameter in head.parameters()):
        return _head_loss(head, hidden, targets, softcap)
    return _chunked_head_loss().apply(hidden, targets, head, softcap, chunk or loss_chunk_tokens(head.weight.shape[0]))
