"""model.fused_kernels=liger: Liger Kernel's Triton norms, gated MLP and rotary embedding patched into the frozen
models leave the composed model's logits and the blocks' gradients as they were. The kernels run where Liger runs
(an NVIDIA GPU and the liger-kernel package); the config's refusal runs anywhere."""
import importlib
import importlib.util

import pytest
import torch

from calm_dist.config import ConfigError, load_config
from calm_dist.model.fused_kernels import FusedKernelsError, apply_fused_kernels, check_fused_kernels
from tests.helpers.tiny import composed, ids

HAVE_LIGER = importlib.util.find_spec("liger_kernel") is not None
liger_runs = pytest.mark.skipif(not (HAVE_LIGER and torch.cuda.is_available()),
                                reason="Liger Kernel needs the liger-kernel package (calm-dist[fused-loss]) and an "
                                       "NVIDIA GPU (Triton)")


def norms(model):
    return [m for name, m in model.named_modules() if name.endswith("norm")]


def logits_and_grads(model, tokens, mask):
    model.zero_grad(set_to_none=True)
    out = model(tokens, attention_mask=mask)
    out.logits.float().pow(2).mean().backward()
    return out.logits.detach().float(), [p.grad.float().clone() for p in model.blocks.parameters()]


@liger_runs
@pytest.mark.parametrize("anchor, augmenting", [("llama", "qwen2"), ("mistral", "llama")])
def test_liger_kernels_keep_logits_and_block_gradients(anchor, augmenting, monkeypatch):
    for family in {anchor, augmenting}:  # Liger also patches the family's module (classes, rotary): undone after
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        for name, value in list(vars(module).items()):
            if not name.startswith("__"):
                monkeypatch.setattr(module, name, value)
    reference = composed(anchor, (augmenting,)).cuda()
    patched = composed(anchor, (augmenting,)).cuda()  # the same seeds: the same weights
    tokens = ids(batch=3, length=17).cuda()
    mask = torch.ones_like(tokens)
    mask[1, :5] = 0  # a left-padded row
    want, want_grads = logits_and_grads(reference, tokens, mask)
    for model in (patched.anchor, *patched.augmenting):
        assert not any(m._get_name().startswith("Liger") for m in norms(model))
        apply_fused_kernels(model, "liger")
        assert norms(model) and all(m._get_name().startswith("Liger") for m in norms(model))
    got, got_grads = logits_and_grads(patched, tokens, mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3 * w.abs().max().item())


@pytest.mark.skipif(not HAVE_LIGER, reason="needs the liger-kernel package")
def test_families_liger_lacks_are_refused_by_name():
    check_fused_kernels("liger", "llama", "model.anchor")
    check_fused_kernels("none", "gpt2", "model.augmenting[0]")
    with pytest.raises(FusedKernelsError, match=r"model.augmenting\[0\]'s family 'gpt2'"):
        check_fused_kernels("liger", "gpt2", "model.augmenting[0]")


@pytest.mark.skipif(HAVE_LIGER, reason="liger-kernel is installed here")
def test_config_refuses_liger_kernels_without_the_package():
    assert load_config(None, []).model.fused_kernels == "none"
    with pytest.raises(ConfigError, match="model.fused_kernels=liger needs the liger-kernel package"):
        load_config(None, ["model.fused_kernels=liger"])
