"""Cached augmenting states: same numbers as recomputing, refusals of stale/corrupt caches, resumable builds."""
import json

import pytest
import torch
from transformers import AutoConfig

from calm_dist import ComposedModel
from calm_dist.cli import main
from calm_dist.config import DataConfig, load_config
from calm_dist.data.prepare import load_rows, load_training_rows
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.files import sha256_file
from calm_dist.model import backbones
from calm_dist.model.composition import capture_block_outputs, position_ids_from_mask
from calm_dist.model.io import load_causal_lm
from calm_dist.model.lm_loss import labelled_tokens
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.parallelize import checkpoint_anchor_blocks, load_frozen_models
from calm_dist.training.preflight import preflight
from calm_dist.training.states_cache import (CacheError, StatesCache, build_cache, cache_root, components,
                                             expected_components, run_cache_job)

from tests.helpers.launch import REPO, Ranks, describe
from tests.helpers.tiny import tiny_setup

PAIRS = [[(1, 1), (3, 3)]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    setup = tiny_setup(root, n_train=40, n_eval=8)
    cfg = DataConfig(train=str(setup / "train.jsonl"), tokenizer=str(setup / "tokenizer.model"), seq_len=32)
    data = load_rows(cfg, cfg.train, "data.train", Tokenizer(cfg.tokenizer), root / "data_cache")
    return setup, data


def comps(setup, data, dtype="fp32"):
    return components([str(setup / "augmenting")], [None], [[1, 3]], data.fingerprint, 32, dtype, "fp32")


def build(setup, data, directory, dtype="fp32", rows_per_shard=16, **kw):
    """40 rows at 16 per shard: shards of 16, 16 and 8 rows, each computed in micro-batches of 8."""
    return build_cache(directory, comps(setup, data, dtype), [load_causal_lm(str(setup / "augmenting"))], [[1, 3]],
                       data, rows_per_shard=rows_per_shard, batch_size=8, progress=False, **kw)


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
                 augmenting_states=states, loss_reduction="sum",
                 position_ids=batch.get("position_ids")).loss / labelled_tokens(batch["labels"])
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.trainable_parameters()]


def randomized_composition(anchor, augmenting):
    torch.manual_seed(0)
    model = ComposedModel.from_pretrained(anchor, augmenting, layer_pairs=PAIRS)
    with torch.no_grad():  # leave the zero init so every block gets gradients
        model.blocks[0][0].o_proj.weight.normal_(0, 0.1)
        model.blocks[0][1].o_proj.weight.normal_(0, 0.1)
    return model


def assert_same_training(model, batch, states, loss_rel, grad_rel):
    """Loss and every gradient tensor, recomputed vs from `states`, each relative to its own size."""
    loss_r, grads_r = loss_and_grads(model, batch)
    loss_c, grads_c = loss_and_grads(model, batch, states)
    assert loss_c == pytest.approx(loss_r, rel=loss_rel, abs=0)
    for a, b in zip(grads_c, grads_r):
        assert (a - b).abs().max() <= grad_rel * b.abs().max()


# fp32 storage: the same numbers. bf16 storage rounds each state to 8 mantissa bits (relative error <= 2^-9):
# measured here, the loss moves by 3.4e-7 (relative) and the largest gradient difference is 2.4e-3 of its tensor's
# largest entry; the tolerances sit about 3x above those, so a state off by more than rounding fails.
@pytest.mark.parametrize("dtype,loss_rel,grad_rel", [("fp32", 1e-6, 1e-6), ("bf16", 1e-6, 1e-2)])
def test_cached_and_recomputed_training_agree(tiny, tmp_path, dtype, loss_rel, grad_rel):
    setup, data = tiny
    cache = StatesCache(build(setup, data, tmp_path / "c", dtype), comps(setup, data, dtype))
    model = randomized_composition(setup / "anchor", [setup / "augmenting"])
    rows = [3, 17, 20, 39, 0, 31]  # across three shards (the last one ragged), unordered
    assert_same_training(model, data.batch(rows), cache.read(rows), loss_rel, grad_rel)


def test_cached_and_recomputed_training_agree_on_packed_rows(tiny, tmp_path):
    """Packed rows (several documents each): the cache holds the states computed with the documents apart, as
    training recomputes them."""
    setup, _ = tiny
    cfg = DataConfig(train=str(setup / "train.jsonl"), tokenizer=str(setup / "tokenizer.model"), seq_len=32,
                     packing=True)
    data = load_rows(cfg, cfg.train, "data.train", Tokenizer(cfg.tokenizer), tmp_path / "data_cache")
    rows = [3, 12, 0, len(data) - 1, 7]
    batch = data.batch(rows)
    assert ((batch["position_ids"] == 0).sum(-1) >= 2).all()  # two or more documents in every row
    cache = StatesCache(build(setup, data, tmp_path / "c"), comps(setup, data))
    model = randomized_composition(setup / "anchor", [setup / "augmenting"])
    assert_same_training(model, batch, cache.read(rows), 1e-6, 1e-6)


def test_a_cache_of_a_mixture_serves_each_sources_rows(tiny, tmp_path):
    """data.train as weighted sources: the cache is built over the mixture's global rows (the first source's,
    then the second's), and the states it serves for rows of either source equal recomputing them."""
    setup, _ = tiny
    (tmp_path / "eval.jsonl").write_text((setup / "eval.jsonl").read_text())  # a second source, other records
    cfg = DataConfig(train=[{"source": str(setup / "train.jsonl"), "weight": 3.0},
                            {"source": str(tmp_path / "eval.jsonl"), "weight": 1.0}],
                     tokenizer=str(setup / "tokenizer.model"), seq_len=32)
    data = load_training_rows(cfg, Tokenizer(cfg.tokenizer), tmp_path / "data_cache")
    assert len(data) == 48 and data.parts[1].fingerprint != data.parts[0].fingerprint
    cache = StatesCache(build(setup, data, tmp_path / "c"), comps(setup, data))
    rows = [47, 3, 40, 17, 44]  # the second source's rows (40..47) and the first's, in one read
    batch = data.batch(rows)
    # the mixture's rows are each source's own rows, read from that source directly
    by_source = [data.parts[1].batch([7]), data.parts[0].batch([3]), data.parts[1].batch([0]),
                 data.parts[0].batch([17]), data.parts[1].batch([4])]
    assert all(torch.equal(batch[k][i], by_source[i][k][0]) for k in batch for i in range(len(rows)))
    model = randomized_composition(setup / "anchor", [setup / "augmenting"])
    assert_same_training(model, batch, cache.read(rows), 1e-6, 1e-6)


def cache_job(setup, out, **overrides):
    """`calm-dist cache` in this process, one rank: the real job, which loads the augmenting model itself."""
    cfg = load_config(REPO / "recipes" / "tiny.yaml", cache_overrides(setup, out, **overrides))
    env = DistEnv(0, 0, 1, 1)
    resolved = preflight(cfg, env, training=False)
    return cfg, resolved, run_cache_job(cfg, env, resolved, rows_per_shard=16, batch_size=8)


def test_a_bf16_saved_augmenting_model_is_cached_in_the_trainers_compute_dtype(tiny, tmp_path):
    """fp32 training: the trainer recomputes the states of a bf16 checkpoint in fp32 (model.augmenting_dtype=auto),
    so the cache job must compute them in fp32 too, and record it. Rows across three shards, the last ragged."""
    setup, _ = tiny
    bf16_dir = tmp_path / "augmenting_bf16"
    load_causal_lm(str(setup / "augmenting")).to(torch.bfloat16).save_pretrained(bf16_dir)
    cfg, resolved, directories = cache_job(setup, tmp_path, **{"model.augmenting": f"[{bf16_dir}]"})
    data = load_rows(cfg.data, cfg.data.train, "data.train", Tokenizer(cfg.data.tokenizer), tmp_path / "data_cache")
    cache = StatesCache(directories["train"], expected_components(cfg, resolved.layer_pairs, data.fingerprint))
    assert {k: cache.manifest["components"][k] for k in ("dtype", "compute_dtype")} == \
        {"dtype": "fp32", "compute_dtype": "fp32"}
    _, (augmenting,), _ = load_frozen_models(cfg, {}, torch.float32, load_anchor=False)  # the recompute path
    rows = [3, 17, 20, 39, 0, 31]
    batch = data.batch(rows)
    mask = batch["attention_mask"]
    recomputed = capture_block_outputs(augmenting, [1, 3], batch["input_ids"], mask, position_ids_from_mask(mask))
    for layer in (1, 3):
        torch.testing.assert_close(cache.read(rows)[0][layer], recomputed[layer], rtol=1e-6, atol=1e-6)
    model = randomized_composition(setup / "anchor", [augmenting])
    assert_same_training(model, batch, cache.read(rows), loss_rel=1e-6, grad_rel=1e-6)


def test_training_without_augmenting_weights(tiny, tmp_path):
    """Configs only: the composition holds no augmenting weights and refuses to run without states."""
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
    with pytest.raises(CacheError, match="compute_dtype: cache has 'fp32', expected 'bf16'"):
        StatesCache(directory, {**comps(setup, data), "compute_dtype": "bf16"})
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
        build(setup, data, partial, rank=0, world=3, barrier=interrupt_on_call(1))
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


def test_a_cache_built_before_compute_dtype_and_shard_size_were_recorded_is_stale(tiny, tmp_path):
    setup, data = tiny
    directory = build(setup, data, tmp_path / "c")
    manifest = json.loads((directory / "manifest.json").read_text())
    old = {k: v for k, v in manifest["components"].items() if k not in ("compute_dtype", "rows_per_shard")}
    (directory / "manifest.json").write_text(json.dumps({**manifest, "components": {**old, "format": 1}}))
    with pytest.raises(CacheError, match="stale cache.*compute_dtype: cache has None, expected 'fp32'.*"
                                         "format: cache has 1, expected 2.*rows_per_shard: not recorded"):
        StatesCache(directory, comps(setup, data))


def rows_of_every_shard_written_by_rank_0_of_2(setup, data, directory):
    """An interrupted build: rank 0 of 2 wrote shards 0 and 2 (16 rows and the ragged last 8), no manifest."""
    with pytest.raises(KeyboardInterrupt):
        build(setup, data, directory, rank=0, world=2, barrier=interrupt_on_call(1))
    assert sorted(p.name for p in directory.glob("shard-*.json")) == ["shard-00000.json", "shard-00002.json"]


def test_a_build_resumed_with_another_shard_size_is_refused(tiny, tmp_path):
    """Resumed at 12 rows per shard, the 16-row shards would be skipped by their sidecars and `divmod(row, 12)`
    would read the wrong rows: refused, naming rows_per_shard. Resumed at 16, every row equals a clean build's
    (one made at 12 rows per shard: the shard size changes no state)."""
    setup, data = tiny
    directory = tmp_path / "c"
    rows_of_every_shard_written_by_rank_0_of_2(setup, data, directory)
    with pytest.raises(CacheError, match="partial cache of other inputs \\(rows_per_shard: cache has 16, expected 12"):
        build(setup, data, directory, rows_per_shard=12)
    assert not (directory / "manifest.json").exists()
    resumed = StatesCache(build(setup, data, directory), comps(setup, data))
    clean = StatesCache(build(setup, data, tmp_path / "clean", rows_per_shard=12), comps(setup, data))
    rows = list(range(len(data)))
    for got, want in zip(resumed.read(rows), clean.read(rows)):
        for layer in (1, 3):
            torch.testing.assert_close(got[layer], want[layer], rtol=1e-6, atol=1e-6)


def cache_overrides(setup, out, **extra) -> list[str]:
    items = {"model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
             "model.layer_pairs": "[[[1,1],[3,3]]]", "data.train": setup / "train.jsonl",
             "data.eval": setup / "eval.jsonl", "data.tokenizer": setup / "tokenizer.model", "data.seq_len": 32,
             "data.cache_dir": out / "data_cache", "train.output_dir": out / "run",
             "train.augmenting_states": "cached", "tracking.enabled": "false", **extra}
    return [f"{k}={v}" for k, v in items.items()]


@pytest.mark.slow
def test_a_refusal_on_rank_0_stops_every_rank(tiny, tmp_path):
    """2 real gloo ranks resume a partial cache begun at 16 rows per shard with --rows-per-shard 8: rank 0 finds
    it, rank 1 learns it from rank 0 (it never reads building.json), and both exit 2 by themselves."""
    setup, _ = tiny
    overrides = cache_overrides(setup, tmp_path)
    cfg = load_config(REPO / "recipes" / "tiny.yaml", overrides)
    resolved = preflight(cfg, DistEnv(0, 0, 1, 1), training=False)  # also writes the tokenized data the ranks read
    data = load_rows(cfg.data, cfg.data.train, "data.train", Tokenizer(cfg.data.tokenizer), tmp_path / "data_cache")
    partial = cache_root(cfg) / "train"
    partial.mkdir(parents=True)
    (partial / "building.json").write_text(json.dumps(
        {**expected_components(cfg, resolved.layer_pairs, data.fingerprint), "rows_per_shard": 16}))
    results = Ranks(["-m", "calm_dist.cli", "cache", "--config", str(REPO / "recipes" / "tiny.yaml"),
                     "--rows-per-shard", "8", *overrides]).wait(timeout=300, kill_peers=False)
    assert [r.returncode for r in results] == [2, 2], describe(results)
    refusal = (f"{partial} holds a partial cache of other inputs (rows_per_shard: cache has 16, expected 8); "
               "remove it first")
    errors = [[line for line in r.output.splitlines() if line.startswith("calm-dist: error:")] for r in results]
    assert errors == [[f"calm-dist: error: {refusal}"],
                      [f"calm-dist: error: cache build stopped by rank 0: {refusal}"]], describe(results)
    assert not list(partial.glob("shard-*"))


@pytest.mark.parametrize("field,value", [("rows", 16), ("first_row", 24)])
def test_a_sidecar_that_does_not_cover_its_rows_is_refused(tiny, tmp_path, field, value):
    """A hand-edited sidecar (the last shard claims 16 rows, or to start at row 24): no manifest is written."""
    setup, data = tiny
    directory = tmp_path / "c"
    rows_of_every_shard_written_by_rank_0_of_2(setup, data, directory)
    sidecar = directory / "shard-00002.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), field: value}))
    with pytest.raises(CacheError, match="shard-00002.json covers .* but with rows_per_shard=16 shard 2 holds "
                                         "rows \\[32, 40\\)"):
        build(setup, data, directory)
    assert not (directory / "manifest.json").exists()


def test_the_reader_serves_only_rows_its_shards_hold(tiny, tmp_path):
    setup, data = tiny
    directory = build(setup, data, tmp_path / "c")
    cache = StatesCache(directory, comps(setup, data))
    for row in (40, -1):
        with pytest.raises(CacheError, match=f"rows \\[{row}\\] are outside the 40 rows cached"):
            cache.read([0, row])
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    # shard 1 of a 12-rows-per-shard build, with a manifest vouching for its checksum: refused when read
    other = build(setup, data, tmp_path / "other", rows_per_shard=12) / "shard-00001.safetensors"
    (directory / "shard-00001.safetensors").write_bytes(other.read_bytes())
    manifest["shards"][1]["sha256"] = sha256_file(other)
    manifest_path.write_text(json.dumps(manifest))
    cache = StatesCache(directory, comps(setup, data))
    cache.verify()
    assert cache.read([0, 39])[0][1].shape[0] == 2  # shards 0 and 2 serve
    with pytest.raises(CacheError, match="shard-00001.safetensors holds a0.l1 of shape \\[12, 32, 48\\], "
                                         "the manifest says \\[16, 32, 48\\]"):
        cache.read([20])
    manifest["shards"][2]["rows"] = 16  # the ragged last shard holds rows [32, 40)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="shard 2 states 16 rows, but holds rows \\[32, 40\\)"):
        StatesCache(directory, comps(setup, data))


@pytest.mark.parametrize("rows_per_shard", ["0", "-3"])
def test_rows_per_shard_must_be_positive(capsys, rows_per_shard):
    assert main(["cache", "--config", "never-read.yaml", "--rows-per-shard", rows_per_shard]) == 2
    assert capsys.readouterr().err.strip().splitlines() == \
        [f"calm-dist: error: --rows-per-shard must be a positive number of rows, got {rows_per_shard}"]


def test_a_cache_of_other_inputs_is_not_resumed(tiny, tmp_path):
    setup, data = tiny
    directory = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build(setup, data, directory, rank=0, world=2, barrier=interrupt_on_call(1))
    with pytest.raises(CacheError, match="partial cache of other inputs.*dtype"):
        build(setup, data, directory, dtype="bf16")


def test_activation_checkpointing_changes_no_number_and_recomputes(tiny):
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
