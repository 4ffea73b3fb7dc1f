"""train.loss_kernel=liger: Liger Kernel's fused linear-cross-entropy gives our chunked loss and gradients. It runs
where Liger runs (an NVIDIA GPU and the liger-kernel package); the switch's plumbing and its checks run anywhere."""
import importlib.util

import pytest
import torch
from torch import nn

from calm_dist.config import ConfigError, load_config
from calm_dist.model import lm_loss
from calm_dist.model.lm_loss import IGNORE, head_loss

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
liger_runs = pytest.mark.skipif(not (HAVE_LIGER and torch.cuda.is_available()),
                                reason="Liger Kernel needs the liger-kernel package (calm-dist[fused-loss]) and an "
                                       "NVIDIA GPU (Triton)")


def case(device, dtype, vocab=1000, rows=3, seq=37, width=64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, seq, width, generator=g).to(device, dtype).requires_grad_(True)
    head = nn.Linear(width, vocab, bias=False).to(device, dtype).requires_grad_(False)
    labels = torch.randint(0, vocab, (rows, seq), generator=g).to(device)
    labels[0, :10] = IGNORE  # a prompt, unlabelled
    return hidden, head, labels


@liger_runs
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_liger_equals_chunked(dtype, tol, reduction):
    hidden, head, labels = case("cuda", dtype)
    losses, grads = [], []
    for kernel in ("chunked", "liger"):
        hidden.grad = None
        loss = head_loss(hidden, head, labels, reduction, kernel=kernel)
        loss.backward()
        losses.append(loss.detach().float())
        grads.append(hidden.grad.float().clone())
    torch.testing.assert_close(losses[1], losses[0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=tol, atol=tol * grads[0].abs().max().item())


@pytest.fixture
def composed():
    import transformers as T

    from calm_dist.model.composition import ComposedModel

    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64)
    anchor = T.LlamaForCausalLM(T.LlamaConfig(**cfg))
    aug = T.LlamaForCausalLM(T.LlamaConfig(**cfg))
    return lambda kernel: ComposedModel(anchor, [aug], layer_pairs=[[(1, 1)]], loss_kernel=kernel)


def test_composition_uses_the_configured_kernel(monkeypatch, composed):
    calls = []

    def stand_in(hidden, weight, bias, targets):
        calls.append(hidden.shape)
        return lm_loss._HeadCrossEntropy.apply(hidden, weight, bias, targets, 64, hidden.requires_grad)

    monkeypatch.setattr(lm_loss, "liger_summed_loss", stand_in)
    ids = torch.randint(0, 64, (2, 9))
    chunked = composed("chunked")(ids, labels=ids).loss
    assert calls == []
    liger = composed("liger")(ids, labels=ids).loss
    assert calls == [torch.Size([16, 32])]  # the 2 x 8 labelled positions, selected before the head
    torch.testing.assert_close(liger, chunked)


def test_liger_refuses_cpu_tensors_with_one_line():
    hidden, head, labels = case("cpu", torch.float32)
    with pytest.raises(ValueError, match="loss_kernel=liger runs on CUDA tensors"):
        head_loss(hidden, head, labels, kernel="liger")
    with pytest.raises(ValueError, match="kernel must be one of"):
        head_loss(hidden, head, labels, kernel="fastest")


@pytest.mark.skipif(HAVE_LIGER, reason="liger-kernel is installed here")
def test_config_refuses_liger_without_the_package():
    assert load_config(None, []).train.loss_kernel == "chunked"
    with pytest.raises(ConfigError, match="train.loss_kernel=liger needs the liger-kernel package"):
        load_config(None, ["train.loss_kernel=liger"])
