"""Fused linear + cross-entropy: the loss over a large vocabulary without its logits in memory.

    loss = linear_cross_entropy(hidden [N, C], weight [V, C], targets long [N], ignore_index=-100)
         == F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=ignore_index)

The plain way keeps the logits [N, V] (and their fp32 copy and the softmax) alive from the forward to
the backward; with V = 8292 and 4096-token rows they are the largest activation of the model. Here
the forward walks over row chunks: each chunk's logits are made, reduced to its loss, turned at once
into their gradient (softmax - one_hot) / n_targets, and pushed through the matmul to the gradients
of the hidden states and of the weight; then they are freed. The backward only scales those two
gradients by the incoming one. The idea of Liger-Kernel's and Cut Cross-Entropy's fused losses, in
plain PyTorch. Under autocast the chunk matmuls run in the autocast dtype, the softmax in fp32.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 2048  # logits of 2048 rows x 8292 ids in fp32: 68 MB at a time


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk_rows: int):
        ctx.weight_dtype = weight.dtype
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).float()  # mean over the real targets, as F.cross_entropy
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            x, keep = hidden[rows], valid[rows]
            target = targets[rows].clamp(min=0)[:, None]  # ignored rows: any id, masked below
            logits = (x @ weight.T).float()  # [n, V]
            lse = logits.logsumexp(dim=-1)  # [n]
            total += ((lse - logits.gather(1, target)[:, 0]) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of row losses)/d logits = softmax - one_hot, zero on ignored rows
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, target, torch.full_like(target, -1, dtype=grad.dtype))
            grad = grad.mul_(keep[:, None]).to(x.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight.to(grad.dtype)
            if grad_weight is not None:
                grad_weight += grad.T @ x
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Mean cross-entropy of logits hidden @ weight.T [N, V] against targets [N] (ignore_index skipped),
    computed chunk by chunk; see the module docstring. hidden [N, C], weight [V, C]."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be [N, C] and targets [N], got {tuple(hidden.shape)} and {tuple(targets.shape)}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, ignore_index, chunk_rows)
