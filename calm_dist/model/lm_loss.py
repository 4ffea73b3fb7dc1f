"""Next-token cross-entropy: from logits, or straight from the final hidden states through a frozen LM head.

The logits of a training batch are its largest tensors (B x T x V: 16 GiB in fp32 at 8 x 4096 tokens and a
128k vocabulary), and in training they only feed the loss. `head_loss` never builds them whole: it takes the
hidden states of the labelled positions only and goes through them a chunk of rows at a time. Because the
head is frozen and the loss is a sum, each chunk's gradient for its hidden states, (softmax - one_hot) @ W, is
known as soon as its logits are, so it is computed there and saved; backward only scales it. The FLOPs are
those of head + cross_entropy (minus the unlabelled rows); the B x T x V logits, log-softmax and gradient
tensors are gone, and so are their copies (the shifted slice, its backward's zero fill).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

# logits per chunk, shared with the memory model
from calm_dist.model.shapes import IGNORE  # noqa: F401  (the loss's own name for it)
from calm_dist.model.shapes import LOSS_CHUNK_LOGITS as CHUNK_LOGITS



def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with input_ids -> each position's target (the next label); the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions have a next-token label: the denominator of the mean loss."""
    return (labels[:, 1:] != IGNORE).sum()


def loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the labelled positions (-100 ignored), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), next_token_targets(labels).flatten(),
                           ignore_index=IGNORE, reduction=reduction)


KERNELS = ("chunked", "liger")


def head_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, reduction: str = "mean",
              kernel: str = "chunked") -> torch.Tensor:
    """loss_from_logits(head(hidden), labels), without the logits: hidden [B, T, D] are the final (normed)
    states; the head's weight must be frozen (its gradient is never computed). `kernel`: chunked, this module's
    PyTorch chunks; liger, Liger Kernel's fused linear-cross-entropy (Triton, NVIDIA GPUs; train.loss_kernel)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, not {kernel!r}")
    if head.weight.requires_grad:
        raise ValueError("head_loss computes no gradient for the LM head: use loss_from_logits for a trainable head")
    targets = next_token_targets(labels).flatten()
    rows = targets != IGNORE
    selected, targets = hidden.flatten(0, 1)[rows], targets[rows]
    with _gathered([head.weight] + ([head.bias] if head.bias is not None else [])):
        if kernel == "liger":
            total = liger_summed_loss(selected, head.weight, head.bias, targets)
        else:
            total = _HeadCrossEntropy.apply(selected, head.weight, head.bias, targets,
                                            max(1, CHUNK_LOGITS // head.weight.shape[0]),
                                            torch.is_grad_enabled() and selected.requires_grad)
    # a micro-batch without labelled tokens: sum 0, mean NaN (as F.cross_entropy gives)
    return total if reduction == "sum" else total / targets.numel()


def liger_summed_loss(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """The summed cross-entropy of F.linear(hidden, weight, bias) by Liger Kernel's fused linear-cross-entropy:
    chunks of logits in Triton kernels, their gradient computed in the forward as ours are, in fp32 whatever the
    inputs' dtype. The `fused-loss` extra installs it; it runs on NVIDIA GPUs only."""
    if hidden.device.type != "cuda":
        raise ValueError(f"train.loss_kernel=liger runs on CUDA tensors (Triton); these are on {hidden.device.type}")
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # an optional extra, imported on use

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


class _HeadCrossEntropy(torch.autograd.Function):
    """Summed CE of F.linear(hidden, weight, bias) against targets, chunked over rows; gradient for hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows: int, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[torch.arange(len(t), device=t.device), t] -= 1
                torch.mm(probs.to(weight.dtype), weight, out=grad[start:start + chunk_rows])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


@contextmanager
def _gathered(params: list[torch.Tensor]):
    """Under ZeRO-3 the head's weight is partitioned. Inside the engine's forward, reading `head.weight` already
    gathers it (DeepSpeed registers it as an external parameter of the running module and frees it after);
    outside a forward it stays partitioned, so gather it here, once for all chunks. Whole weights and ordinary
    tensors are left as they are."""
    missing = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name != "AVAILABLE"]
    if not missing:
        yield
        return
    import deepspeed  # here: only a ZeRO-3 partitioned weight needs it, and importing it is slow

    with deepspeed.zero.GatheredParameters(missing):
        yield
