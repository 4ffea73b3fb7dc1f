"""Cached augmenting states: same numbers as recomputing, refusals of stale/corrupt caches, resumable builds."""
import json

import pytest
import torch

from calm_dist import ComposedModel
from calm_dist.augmenter_cache import CacheError, StatesCache, build_cache, components, sha256_file
from calm_dist.config import DataConfig
from calm_dist.data import Tokenizer, load_tokenized
from calm_dist.lm_loss import labelled_tokens

PAIRS = [[(1, 1), (3, 3)]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import tiny_setup

    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, n_train=40, n_eval=8)
    cfg = DataConfig(train=str(setup / "train.jsonl"), tokenizer=str(setup / "tokenizer.model"), seq_len=32)
    data = load_tokenized(cfg, cfg.train, Tokenizer(cfg.tokenizer), root / "data_cache")
    return setup, data


def comps(setup, data, dtype="fp32"):
    return components([str(setup / "augmenting")], [None], [[1, 3]], data.fingerprint, 32, dtype)


def build(setup, data, directory, dtype="fp32", **kw):
    from calm_dist.composition import load_causal_lm

    return build_cache(directory, comps(setup, data, dtype), [load_causal_lm(str(setup / "augmenting"))], [[1, 3]],
                       data, rows_per_shard=16, batch_size=8, progress=False, **kw)


def interrupt_on_call(n):
    calls = []

    def barrier():
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
    return barrier


def loss_and_grads(model, batch, states=None):
    model.zero_grad()
    loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 augmenting_states=states, loss_reduction="sum").loss / labelled_tokens(batch["labels"])
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.trainable_parameters()]


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-6), ("bf16", 2e-2)])
def test_cached_and_recomputed_training_agree(tiny, tmp_path, dtype, tol):
    """fp32: <= 1e-6. bf16 storage rounds each state to 8 mantissa bits: documented tolerance 2e-2 (relative)."""
    setup, data = tiny
    cache = StatesCache(build(setup, data, tmp_path / "c", dtype), comps(setup, data, dtype))
    torch.manual_seed(0)
    model = ComposedModel.from_pretrained(setup / "anchor", [setup / "augmenting"], layer_pairs=PAIRS)
    with torch.no_grad():  # leave the zero init so every block gets gradients
        model.blocks[0][0].o_proj.weight.normal_(0, 0.1)
        model.blocks[0][1].o_proj.weight.normal_(0, 0.1)
    rows = [3, 17, 20, 39, 0, 31]  # across three shards, unordered
    batch = data.batch(rows)
    loss_r, grads_r = loss_and_grads(model, batch)
    loss_c, grads_c = loss_and_grads(model, batch, cache.read(rows))
    assert loss_c == pytest.approx(loss_r, rel=tol, abs=tol)
    for a, b in zip(grads_c, grads_r):
        assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item())


def test_training_without_augmenting_weights(tiny, tmp_path):
    """Configs only: the composition holds no augmenting weights and refuses to run without states."""
    from transformers import AutoConfig

    setup, data = tiny
    model = ComposedModel.from_pretrained(setup / "anchor", [AutoConfig.from_pretrained(setup / "augmenting")],
                                          layer_pairs=PAIRS)
    assert len(model.augmenting) == 0
    with pytest.raises(Exception, match="no augmenting weights"):
        model(data.batch([0])["input_ids"])


def test_stale_truncated_and_flipped_caches_are_refused(tiny, tmp_path):
    setup, data = tiny
    directory = build(setup, data, tmp_path / "c")
    with pytest.raises(CacheError, match="stale cache.*layers: cache has \\[\\[1, 3\\]\\], expected \\[\\[1, 2\\]\\]"):
        StatesCache(directory, {**comps(setup, data), "layers": [[1, 2]]})
    with pytest.raises(CacheError, match="dtype: cache has 'fp32', expected 'bf16'"):
        StatesCache(directory, comps(setup, data, "bf16"))
    cache = StatesCache(directory, comps(setup, data))
    cache.verify()  # intact
    shard = directory / "shard-00001.safetensors"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="shard-00001.safetensors is corrupted"):
        cache.verify()
    shard.write_bytes(original[: len(original) // 2])
    with pytest.raises(CacheError, match="shard-00001.safetensors is corrupted or truncated"):
        cache.verify()


def test_interrupted_cache_build_resumes_byte_identical(tiny, tmp_path):
    setup, data = tiny
    complete = build(setup, data, tmp_path / "complete")
    partial = tmp_path / "partial"
    with pytest.raises(KeyboardInterrupt):  # rank 0 of 3 is stopped at the barrier after writing its shard
        build(setup, data, partial, rank=0, world=3, barrier=interrupt_on_call(2))
    assert not (partial / "manifest.json").exists()
    for s in (1, 2):
        assert not (partial / f"shard-{s:05d}.json").exists()
    before = (partial / "shard-00000.safetensors").stat().st_mtime_ns
    build(setup, data, partial)  # resume single-process: only the missing shards are computed
    assert (partial / "shard-00000.safetensors").stat().st_mtime_ns == before
    names = sorted(p.name for p in complete.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in partial.glob("shard-*.safetensors")) and len(names) == 3
    for name in names:
        assert sha256_file(complete / name) == sha256_file(partial / name)
    assert json.loads((partial / "manifest.json").read_text())["shards"] == \
        json.loads((complete / "manifest.json").read_text())["shards"]


def test_a_cache_of_other_inputs_is_not_resumed(tiny, tmp_path):
    setup, data = tiny
    directory = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build(setup, data, directory, rank=0, world=2, barrier=interrupt_on_call(2))
    with pytest.raises(CacheError, match="partial cache of other inputs.*dtype"):
        build(setup, data, directory, dtype="bf16")


def test_activation_checkpointing_changes_no_number_and_recomputes(tiny):
    from calm_dist import backbones
    from calm_dist.activation_checkpointing import checkpoint_anchor_blocks

    setup, data = tiny
    batch = data.batch([1, 2, 3, 4])

    def fresh():
        torch.manual_seed(0)
        m = ComposedModel.from_pretrained(setup / "anchor", [setup / "augmenting"], layer_pairs=PAIRS)
        with torch.no_grad():
            m.blocks[0][0].o_proj.weight.normal_(0, 0.1)
        return m

    plain, checkpointed = fresh(), fresh()
    assert checkpoint_anchor_blocks(checkpointed) == [2, 3]  # above the first composed anchor block (1)
    calls = {"plain": 0, "checkpointed": 0}
    for name, m in (("plain", plain), ("checkpointed", checkpointed)):
        backbones.decoder_blocks(m.anchor)[3].mlp.register_forward_pre_hook(
            lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    loss_p, grads_p = loss_and_grads(plain, batch)
    loss_c, grads_c = loss_and_grads(checkpointed, batch)
    assert loss_c == loss_p
    assert all(torch.equal(a, b) for a, b in zip(grads_c, grads_p))
    assert calls == {"plain": 1, "checkpointed": 2}  # the backward really re-ran the block
