"""The loss without logits (lm_loss.head_loss) equals cross-entropy over the logits, in value and gradient."""
import pytest
import torch

from calm_dist.model import lm_loss
from calm_dist.model.lm_loss import head_loss, loss_from_logits
from tests.helpers.tiny import FAMILIES, VOCAB, composed, ids


def labelled(x, first=5):
    labels = x.clone()
    labels[:, :first] = -100  # a prompt
    labels[1, -3:] = -100     # and a right-padded row
    return labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [False, True])
def test_head_loss_equals_logits_path_value_and_gradient(monkeypatch, reduction, bias):
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 7 * VOCAB)  # chunks of 7 rows: several, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(24, VOCAB, bias=bias).requires_grad_(False)
    x = ids(batch=3, length=11)
    labels = labelled(x)
    hidden = torch.randn(3, 11, 24, requires_grad=True)
    expected = loss_from_logits(head(hidden), labels, reduction)
    (expected_grad,) = torch.autograd.grad(expected * 3.0, hidden)
    loss = head_loss(hidden, head, labels, reduction)
    (grad,) = torch.autograd.grad(loss * 3.0, hidden)  # backward scales the gradient saved in forward
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-7, rtol=1e-5)
    assert grad[:, :4].abs().max() == 0 and grad[1, -4:].abs().max() == 0  # rows without a target


def test_head_loss_without_targets_and_without_grad():
    head = torch.nn.Linear(8, VOCAB, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    none = torch.full((2, 6), -100)
    total = head_loss(hidden, head, none, "sum")
    assert total.item() == 0.0
    total.backward()
    assert hidden.grad.abs().max() == 0
    assert torch.isnan(head_loss(hidden, head, none, "mean"))  # as F.cross_entropy: 0 / 0
    labels = ids(batch=2, length=6)
    with torch.no_grad():
        torch.testing.assert_close(head_loss(hidden, head, labels), loss_from_logits(head(hidden), labels))


def test_head_loss_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="trainable head"):
        head_loss(torch.randn(1, 4, 8), torch.nn.Linear(8, VOCAB), ids(batch=1, length=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_composed_loss_without_logits_equals_the_logits_path(family):
    """Every supported anchor family computes its logits as output_embeddings(decoder output)."""
    model = composed(family, ("llama",))
    x = ids()
    labels = labelled(x)
    results = []
    for return_logits in (False, True):
        model.zero_grad()
        loss = model(x, labels=labels, return_logits=return_logits, loss_reduction="sum").loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    (fused, fused_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
