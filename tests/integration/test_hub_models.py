"""Models and tokenizers by hub id from a Hugging Face cache the tests lay out (the hub offline: no network here),
and the vocabulary decided by the tokenizers: one tokenizer with padded tables of other sizes composes (a
Qwen2.5-7B + 0.5B shaped pair), another tokenizer of the same size is refused naming the first differing token."""
import json
import subprocess
import sys
import threading

import pytest

from calm_dist.config import ConfigError, load_config
from calm_dist.rank_zero import RankZeroFailed
from calm_dist.tiny_setup import WORDS, make_records
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.preflight import preflight
from tests.helpers.hub_cache import commit, offline_hub, publish, qwen2_model, word_tokenizer
from tests.helpers.launch import REPO, base_env

ANCHOR, SMALL = "org/anchor-7b", "org/augmenting-0.5b"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    return offline_hub(tmp_path / "hf_cache", monkeypatch)


@pytest.fixture
def data(tmp_path):
    for name, n, seed in (("train.jsonl", 16, 0), ("eval.jsonl", 4, 1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in make_records(n, seed)))
    return tmp_path


def model_repo(hub, tmp_path, repo_id, rows, *, tokenizer_words=WORDS, n=0, **kw):
    """A tiny Qwen2 of `rows` embedding rows saved with its word tokenizer (None: without one), published."""
    source = tmp_path / "sources" / repo_id / str(n)
    qwen2_model(source, rows, **kw)
    if tokenizer_words is not None:
        word_tokenizer(source, list(tokenizer_words))
    return publish(hub, repo_id, source, commit(n + 1))


def run_config(data, *overrides):
    return load_config(None, [f"model.anchor={ANCHOR}", f"model.augmenting=[{SMALL}]",
                              f"data.train={data / 'train.jsonl'}", f"data.eval={data / 'eval.jsonl'}",
                              "data.seq_len=16", f"train.output_dir={data / 'out'}", "train.steps=2",
                              "train.micro_batch_size=2", "tracking.enabled=false", *overrides])


def padded_pair(hub, tmp_path):
    """One tokenizer (43 tokens), tables padded to other sizes as Qwen2.5-7B's (152,064 rows) and 0.5B's
    (151,936): the anchor 64 rows and no pad id, the augmenting model 48 rows and pad 0. Weights drawn wide
    enough that greedy decoding does not repeat one token."""
    model_repo(hub, tmp_path, ANCHOR, 64, hidden=48, layers=6, seed=1, pad_token_id=None, initializer_range=0.3)
    model_repo(hub, tmp_path, SMALL, 48, seed=2, initializer_range=0.3)


def test_one_tokenizer_with_padded_tables_composes_from_hub_ids_offline(hub, data, tmp_path):
    """Preflight resolves both hub ids in the cache, takes the anchor's own tokenizer for the data (data.tokenizer
    unset) and accepts the pair; the Python API composes the same ids, and its export names the hub ids."""
    from calm_dist import ComposedModel

    padded_pair(hub, tmp_path)
    resolved = preflight(run_config(data), DistEnv(0, 0, 1, 1))
    assert (resolved.anchor_config.vocab_size, resolved.augmenting_configs[0].vocab_size) == (64, 48)

    from calm_dist.data.prepare import load_training_rows
    from calm_dist.data.tokenizer import anchor_tokenizer
    from calm_dist.training.preflight import data_cache_dir

    cfg = run_config(data)
    tokenizer = anchor_tokenizer(cfg)
    assert tokenizer.vocab_size == 43 and tokenizer.path.parent.name == "snapshots"
    rows = load_training_rows(cfg.data, tokenizer, data_cache_dir(cfg), is_writer=False)
    batch = rows.batch(list(range(4)))
    assert int(batch["input_ids"].max()) < 43

    model = ComposedModel.from_pretrained(ANCHOR, [SMALL])
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape[-1] == 64
    model.save_composition(tmp_path / "comp")
    saved = json.loads((tmp_path / "comp" / "composition.json").read_text())
    assert (saved["anchor"]["name_or_path"], saved["augmenting"][0]["name_or_path"]) == (ANCHOR, SMALL)


@pytest.mark.parametrize("data_tokenizer", [False, True], ids=["anchor's-own", "data.tokenizer-set"])
def test_another_tokenizer_of_the_same_size_is_refused_naming_the_first_differing_token(hub, data, tmp_path,
                                                                                         data_tokenizer):
    """Equal tables (48 rows), equal special ids, tokenizers of 43 tokens each: but the augmenting model's gives
    the words other ids (Llama-2 and Mistral-v0.1 share 32,000 tokens and bos/eos, not a vocabulary)."""
    anchor = model_repo(hub, tmp_path, ANCHOR, 48, seed=1)
    model_repo(hub, tmp_path, SMALL, 48, tokenizer_words=list(reversed(WORDS)), seed=2)
    overrides = [f"data.tokenizer={anchor}"] if data_tokenizer else []
    reference = "data.tokenizer" if data_tokenizer else "model.anchor's tokenizer"
    with pytest.raises(ConfigError, match=f"id 6 is 'alpha' in {reference}, 'eight' in model.augmenting\\[0\\]'s "
                                          "tokenizer \\(43 and 43 tokens\\)"):
        preflight(run_config(data, *overrides), DistEnv(0, 0, 1, 1))


def test_a_table_smaller_than_the_tokenizer_is_refused(hub, data, tmp_path):
    model_repo(hub, tmp_path, ANCHOR, 64, seed=1)
    model_repo(hub, tmp_path, SMALL, 40, seed=2)  # 43 tokens: ids 40-42 would fall off its table
    with pytest.raises(ConfigError, match="model.augmenting\\[0\\]'s tokenizer does not match the augmenting model 0: "
                                          "tokenizer has 43 tokens, the model's vocabulary \\(embedding table\\) 40"):
        preflight(run_config(data), DistEnv(0, 0, 1, 1))


def test_data_augmenting_tokenizers_gives_an_augmenting_model_its_tokenizer(hub, data, tmp_path):
    """An augmenting model saved without a tokenizer reads the data's ids, unless data.augmenting_tokenizers names
    its own: then that one must have the data tokenizer's vocabulary too. One entry per augmenting model."""
    padded_pair(hub, tmp_path)
    model_repo(hub, tmp_path, "org/bare", 48, tokenizer_words=None, seed=3)
    word_tokenizer(tmp_path / "other_tokenizer", list(reversed(WORDS)))
    bare = ["model.augmenting=[org/bare]"]
    assert preflight(run_config(data, *bare), DistEnv(0, 0, 1, 1)).augmenting_configs[0].vocab_size == 48
    with pytest.raises(ConfigError, match="data.augmenting_tokenizers\\[0\\] .* is another tokenizer than "
                                          "model.anchor's tokenizer .*: id 6 is 'alpha'"):
        preflight(run_config(data, *bare, f"data.augmenting_tokenizers=[{tmp_path / 'other_tokenizer'}]"),
                  DistEnv(0, 0, 1, 1))
    with pytest.raises(ConfigError, match="data.augmenting_tokenizers must name one tokenizer \\(or null\\) per"):
        preflight(run_config(data, *bare, "data.augmenting_tokenizers=[null, null]"), DistEnv(0, 0, 1, 1))


def test_a_tokenizer_saved_with_a_model_is_fingerprinted_without_the_weights(tmp_path):
    """The data's fingerprint holds the tokenizer's files: for a tokenizer in a model's directory (the anchor's own)
    the weights are no part of it, so new weights neither re-tokenize the data nor are read to fingerprint it."""
    from calm_dist.data.tokenizer import Tokenizer

    qwen2_model(tmp_path / "model", 48)
    word_tokenizer(tmp_path / "model")
    before = Tokenizer(tmp_path / "model").fingerprint()
    qwen2_model(tmp_path / "model", 48, seed=3)  # the same config, other weights
    assert Tokenizer(tmp_path / "model").fingerprint() == before


def test_a_hub_repository_of_pickled_weights_is_refused_saying_how_to_convert(hub, data, tmp_path):
    source = tmp_path / "pickled"
    qwen2_model(source, 48)
    (source / "model.safetensors").unlink()
    (source / "pytorch_model.bin").write_bytes(b"never unpickled")
    word_tokenizer(source)
    publish(hub, "org/pickled", source, commit(1))
    model_repo(hub, tmp_path, SMALL, 48)
    with pytest.raises(ConfigError, match="model.anchor: the hub repository org/pickled holds no safetensors weights"
                                          ".*unpickling runs whatever code.*safe_serialization=True"):
        preflight(run_config(data, "model.anchor=org/pickled"), DistEnv(0, 0, 1, 1))


def test_an_id_missing_from_the_cache_offline_is_one_line_exit_2(hub, data):
    proc = subprocess.run([sys.executable, str(REPO / "calm_dist" / "train.py"), "model.anchor=org/not-cached",
                           f"model.augmenting=[{SMALL}]", f"data.train={data / 'train.jsonl'}",
                           f"train.output_dir={data / 'out'}", "tracking.enabled=false"],
                          env=base_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("calm_dist:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert "model.anchor: org/not-cached is not in the Hugging Face cache" in lines[0]
    assert "the hub is offline (HF_HUB_OFFLINE=1)" in lines[0] and str(hub) in lines[0]
    assert not (data / "out").exists()


def test_rank_zero_alone_fetches_and_its_failure_reaches_every_rank(hub, tmp_path):
    """Rank 1 never fetches: it waits for rank 0, and ends with rank 0's one line when rank 0 cannot fetch (here:
    offline and not cached). Once the cache holds the snapshot, no rank fetches or waits."""
    from calm_dist.model.hub import fetch_on_rank_zero

    def rank(r, errors):
        try:
            fetch_on_rank_zero(SMALL, None, "model.augmenting[0]", weights=True, is_rank_zero=r == 0, silence_s=30,
                               status_dir=tmp_path / "status")
        except ConfigError as e:
            errors[r] = e

    errors = {}
    waiting = threading.Thread(target=rank, args=(1, errors))
    waiting.start()
    rank(0, errors)
    waiting.join(60)
    assert "is not in the Hugging Face cache" in str(errors[0]) and not isinstance(errors[0], RankZeroFailed)
    assert isinstance(errors[1], RankZeroFailed) and str(errors[0]) in str(errors[1])

    model_repo(hub, tmp_path, SMALL, 48)
    errors.clear()
    rank(1, errors)  # returns at once: the snapshot is complete in the cache
    assert errors == {}


def test_the_states_cache_fingerprint_covers_hub_models(hub, data, tmp_path):
    """A hub id's weights are fingerprinted in its snapshot, as its local copy's are; a new commit of the branch
    changes the components."""
    from calm_dist.training.states_cache import expected_components, weights_fingerprint

    padded_pair(hub, tmp_path)
    cfg = run_config(data)
    first = expected_components(cfg, [[(3, 5)]], "data")
    assert first["augmenting_weights"] == [weights_fingerprint(tmp_path / "sources" / SMALL / "0")]
    model_repo(hub, tmp_path, SMALL, 48, seed=7, n=1)  # the branch moves on to other weights
    second = expected_components(cfg, [[(3, 5)]], "data")
    assert second["augmenting_weights"] != first["augmenting_weights"]


def test_eval_and_generate_read_hub_ids_and_stop_at_any_of_a_list_of_eos_ids(hub, data, tmp_path):
    """The anchor's config lists two eos ids, as Llama-3's does. `calm-dist generate` (its tokenizer: the one saved
    with the anchor) and `calm-dist eval` load the hub ids offline and stop at either id, as the same decoding in
    this process does."""
    import torch

    from calm_dist import ComposedModel
    from calm_dist.data.tokenizer import Tokenizer, prompt_ids
    from calm_dist.task_eval import answer_text, composed_fns, evaluate_set
    from tests.helpers.tiny import randomize_composition

    padded_pair(hub, tmp_path)
    composed = ComposedModel.from_pretrained(ANCHOR, [SMALL]).eval()
    randomize_composition(composed, scale=1.0)
    composed.save_composition(tmp_path / "comp")
    tok = Tokenizer(tmp_path / "sources" / ANCHOR / "0")
    prompt = make_records(1, seed=5)[0]["prompt"]
    ids = torch.tensor([prompt_ids(tok, prompt)])
    free = composed.generate(ids, max_new_tokens=8, eos_token_id=-1, pad_token_id=0)[0, ids.shape[1]:].tolist()
    k = next(k for k in range(1, len(free)) if free[k] not in free[:k] and 3 < free[k] < tok.vocab_size)
    eos = [tok.eos_id, free[k]]
    source = tmp_path / "sources" / ANCHOR / "0"
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    publish(hub, ANCHOR, source, commit(9))  # the branch moves to the Llama-3 style config; the weights are the same

    cli = [sys.executable, "-m", "calm_dist.cli"]
    out = subprocess.run([*cli, "generate", str(tmp_path / "comp"), "--prompt", prompt, "--max-new-tokens", "8"],
                         env=base_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == answer_text(tok, free[:k]) != answer_text(tok, free)

    report = tmp_path / "eval.json"
    proc = subprocess.run([*cli, "eval", f"model.anchor={ANCHOR}", f"model.augmenting=[{SMALL}]",
                           f"train.output_dir={tmp_path / 'run'}", "tracking.enabled=false", "--composition",
                           f"composed={tmp_path / 'comp'}", "--set", f"eval={data / 'eval.jsonl'}", "--models", "",
                           "--max-new-tokens", "8", "--json", str(report)],
                          env=base_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(report.read_text())["composed"]["eval"]
    rows = make_records(4, seed=1)
    ours = evaluate_set(*composed_fns(composed, eos, tok.pad_id), tok, rows, max_new_tokens=8, stops=eos)
    assert got["examples"] == ours.examples and got["loss"] == pytest.approx(ours.loss, abs=1e-5)


@pytest.mark.slow
def test_two_ranks_train_a_composition_of_hub_ids_offline(hub, data, tmp_path):
    """The README's "Training at scale" shape: the models named by hub id alone (their tokenizer the anchor's),
    read from the cache by both ranks under ZeRO-3; the export names the hub ids."""
    from tests.helpers.launch import Ranks, describe

    padded_pair(hub, tmp_path)
    out = data / "out"
    argv = [str(REPO / "calm_dist" / "train.py"), f"model.anchor={ANCHOR}", f"model.augmenting=[{SMALL}]",
            f"data.train={data / 'train.jsonl'}", "data.seq_len=16", f"train.output_dir={out}", "train.steps=2",
            "train.micro_batch_size=2", "train.log_every=1", "tracking.enabled=false"]
    results = Ranks(argv).wait(timeout=600)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    exported = json.loads((out / "final" / "composition.json").read_text())
    assert (exported["anchor"]["name_or_path"], exported["augmenting"][0]["name_or_path"]) == (ANCHOR, SMALL)
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss" in line]) == 2
