"""Training a composition whose augmenting model reads through another tokenizer (data.different_tokenizers) under
real DeepSpeed ZeRO-3 on 2 gloo ranks: a Llama anchor of the tiny set-up's SentencePiece tokenizer and a GPT-2
augmenting model of a byte-level BPE built here. Its losses and weights equal a single-process reference built
from the records alone (anchor ids and spans read plainly, token_alignment's reference alignment, no calm_dist data
path, no DeepSpeed), with the augmenting states recomputed and read from `calm-dist cache`."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_dist import ComposedModel
from calm_dist.config import load_config
from calm_dist.data.tokenizer import Tokenizer
from calm_dist.model.lm_loss import IGNORE
from calm_dist.model.token_alignment import align
from tests.helpers.launch import REPO, run_ranks
from tests.helpers.reference_training import optimizer_step, reference_batches, reference_optimizer
from tests.helpers.tiny import tiny_setup
from tests.helpers.tokenizers import byte_level_bpe, split_by_decoding

pytestmark = pytest.mark.slow
WORKER = str(REPO / "tests" / "helpers" / "workers" / "zero3_worker.py")
RECIPE = REPO / "recipes" / "tiny.yaml"
STEPS, GLOBAL_BATCH, N_TRAIN, SEQ_LEN = 4, 16, 32, 32  # 2 ranks x micro-batch 4 x accumulation 2


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    setup = tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=N_TRAIN, n_eval=6)
    byte_level_bpe(setup / "bpe", 60)  # the augmenting model's own tokenizer: another vocabulary, other cuts
    return setup


def overrides(setup: Path, out: Path, **extra) -> list[str]:
    items = {
        "model.anchor": setup / "anchor", "model.augmenting": f"[{setup / 'augmenting'}]",
        "model.layer_pairs": "[[[1,1],[3,3]]]",
        "data.train": setup / "train.jsonl", "data.eval": setup / "eval.jsonl",
        "data.tokenizer": setup / "tokenizer.model", "data.seq_len": SEQ_LEN,
        "data.different_tokenizers": "true", "data.augmenting_tokenizers": f"[{setup / 'bpe'}]",
        "data.augmenting_seq_len": 96,
        "data.cache_dir": out.parent / "data_cache", "train.output_dir": out, "train.steps": STEPS,
        "train.micro_batch_size": 4, "train.global_batch_size": GLOBAL_BATCH, "train.log_every": 1,
        "optim.lr": 3e-3, "optim.warmup_steps": 2, "tracking.enabled": "false",
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def run_worker(setup, out, **extra):
    report = out.parent / f"{out.name}.report.json"
    run_ranks([WORKER, str(report), str(RECIPE), *overrides(setup, out, **extra)], world=2, timeout=600)
    return json.loads(report.read_text())


def reference_rows(records, atok, gtok, indices):
    """The rows of `indices`, read plainly: bos + prompt + completion + eos of the anchor (the loss on the
    completion and eos), each token's span in prompt + completion, padded to SEQ_LEN; the augmenting side by
    token_alignment's reference (every prefix read whole)."""
    ids = torch.full((len(indices), SEQ_LEN), atok.pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask, spans, texts = torch.zeros_like(ids), torch.zeros(len(indices), SEQ_LEN, 2, dtype=torch.long), []
    for i, row in enumerate(indices):
        prompt, completion = records[row]["prompt"], records[row]["completion"]
        p_ids, p_spans = atok.encode_with_spans(prompt)
        c_ids, c_spans = atok.encode_with_spans(completion)
        text = prompt + completion
        row_ids = [atok.bos_id, *p_ids, *c_ids, atok.eos_id]
        n, start = len(row_ids), 1 + len(p_ids)
        ids[i, :n], mask[i, :n] = torch.tensor(row_ids), 1
        labels[i, start:n] = ids[i, start:n]
        spans[i, :n] = torch.tensor([(0, 0), *p_spans, *((s + len(prompt), e + len(prompt)) for s, e in c_spans),
                                     (len(text), len(text))])
        texts.append(text)
    return ids, mask, labels, align(texts, spans, mask, gtok, pad_id=gtok.pad_id, window=None)


def reference_training(setup: Path, out: Path):
    cfg = load_config(RECIPE, overrides(setup, out))
    records = [json.loads(line) for line in (setup / "train.jsonl").read_text().splitlines()]
    atok, gtok = Tokenizer(setup / "tokenizer.model"), Tokenizer(setup / "bpe")
    model, params, opt, sched = reference_optimizer(cfg)
    losses, tails = [], 0
    for rows in reference_batches(len(records), GLOBAL_BATCH, cfg.train.seed, cfg.train.steps):
        ids, mask, labels, aligned = reference_rows(records, atok, gtok, rows.tolist())
        tails += int(aligned.reading.max())
        logits = model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits
        losses.append(optimizer_step(logits, labels, params, opt, sched, cfg.optim.grad_clip))
    assert tails > 0  # prefixes read otherwise than the whole text: the tails train too
    return losses, model.composition_state_dict()


@pytest.fixture(scope="module")
def reference(setup_dir, tmp_path_factory):
    return reference_training(setup_dir, tmp_path_factory.mktemp("ref") / "ref")


def assert_matches(report, out, reference):
    ref_losses, ref_weights = reference
    assert len(report["losses"]) == STEPS
    assert report["losses"] == pytest.approx(ref_losses, abs=1e-5)
    trained = load_file(str(out / "final" / "composition.safetensors"))
    assert trained.keys() == ref_weights.keys()
    for k in trained:
        torch.testing.assert_close(trained[k], ref_weights[k], atol=1e-4, rtol=0)


def test_two_rank_zero3_with_recomputed_augmenting_states_matches_the_reference(setup_dir, tmp_path, reference,
                                                                                 capsys):
    """...and the export records that it reads across tokenizers, with which tokenizers: `calm-dist generate` and
    `calm-dist eval` (test below) decode it across tokenizers."""
    out = tmp_path / "recompute"
    report = run_worker(setup_dir, out)
    assert_matches(report, out, reference)
    assert report["losses"][-1] < report["losses"][0]
    training = json.loads((out / "final" / "composition.json").read_text())["training"]
    assert training["different_tokenizers"] is True
    assert training["tokenizers"] == {"anchor": str(setup_dir / "tokenizer.model"),
                                      "augmenting": [str(setup_dir / "bpe")]}
    # the set-up's completions start with a space (" beta alpha"), which the SentencePiece anchor's ids give back
    # only decoded after the prompt's: decoding rebuilds a completion's text so
    assert training["completion_decoding"] == "after_prompt"
    generation_matches_a_reference(setup_dir, out, tmp_path, capsys)
    evaluation_matches_a_reference(setup_dir, out, tmp_path)


def generation_matches_a_reference(setup: Path, out: Path, tmp_path: Path, capsys):
    """`calm-dist generate` of an export across tokenizers, with the tokenizers it recorded and given explicitly,
    prints the answer of decoding that recomputes the whole text each step (generate_across_tokenizers,
    use_cache=False), the new ids turned into text as the export recorded of its training records. The export's
    blocks are randomised first, so the augmenting tokenizer changes the answers; sampling, a tokenizer count that
    is not the model count, and --compile are one line and exit code 2."""
    from calm_dist.cli import main
    from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers
    from calm_dist.task_eval import answer_text
    from tests.helpers.tiny import randomize_composition

    atok, gtok = Tokenizer(setup / "tokenizer.model"), Tokenizer(setup / "bpe")
    model = ComposedModel.from_composition(out / "final").eval()
    randomize_composition(model, seed=3, scale=1.0)
    final = str(model.save_composition(tmp_path / "randomised", training=json.loads(
        (out / "final" / "composition.json").read_text())["training"]))

    def decoded(prompt: str, tokenizer) -> str:
        with torch.no_grad():
            new = generate_across_tokenizers(model, [prompt], atok, [tokenizer], use_cache=False, max_new_tokens=8,
                                             eos_token_id=[atok.eos_id]).ids[0]
        return answer_text(atok, new, [atok.eos_id]) + "\n"

    def cli(*args) -> tuple[int, str, list[str]]:
        capsys.readouterr()
        code = main(["generate", final, "--max-new-tokens", "8", *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err.splitlines()

    prompts = ("reverse: alpha beta =", "reverse: gamma =", "reverse: delta epsilon zeta =")
    explicit = ["--tokenizer", str(setup / "tokenizer.model"), "--augmenting-tokenizer", str(setup / "bpe")]
    for prompt in prompts:
        assert cli("--prompt", prompt)[:2] == (0, decoded(prompt, gtok))
        assert cli("--prompt", prompt, *explicit)[:2] == (0, decoded(prompt, gtok))
    # read through the anchor's tokenizer instead, the augmenting model decodes otherwise
    assert any(decoded(p, atok) != decoded(p, gtok) for p in prompts)
    for prompt in prompts:
        assert cli("--prompt", prompt, "--augmenting-tokenizer", str(setup / "tokenizer.model"))[:2] == \
            (0, decoded(prompt, atok))
    for extra, message in ((["--temperature", "0.7"], "decodes greedily"),
                           (["--augmenting-tokenizer", str(setup / "bpe")] * 2, "2 tokenizer(s) for 1"),
                           (["--compile"], "--compile decodes compositions whose models share one tokenizer")):
        code, _, errors = cli("--prompt", "reverse: a =", *extra)
        assert code == 2 and len(errors) == 1 and message in errors[0], errors


def reference_completion_loss(logits, labels) -> tuple[float, int]:
    targets = labels[:, 1:]
    keep = targets != IGNORE
    losses = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
    return float(losses), int(keep.sum())


def evaluation_matches_a_reference(setup: Path, out: Path, tmp_path: Path):
    """`calm-dist eval` across tokenizers, in batches of 4 over 6 records (left padding, two batches), equals a
    reference computed record by record: the composition's completion loss from the plainly read rows and the
    reference alignment, its answers from decoding that recomputes the whole text each step; the augmenting
    model alone scored in its own tokenizer's ids, of the text read whole (on a second set whose prompts end with a
    space, which the byte-level BPE reads within the completion's first token: read apart it scores otherwise)."""
    from calm_dist.cli import main
    from calm_dist.model.cross_tokenizer_generation import generate_across_tokenizers
    from transformers import AutoModelForCausalLM

    results = tmp_path / "eval.json"
    records = [json.loads(line) for line in (setup / "eval.jsonl").read_text().splitlines()]
    assert len(records) == 6
    spaced = [{"prompt": r["prompt"] + " ", "completion": r["completion"].lstrip(" ")} for r in records]
    (tmp_path / "spaced.jsonl").write_text("".join(json.dumps(r) + "\n" for r in spaced))
    assert main(["eval", "--config", str(RECIPE), *overrides(setup, out), "--composition", f"composed={out / 'final'}",
                 "--set", f"eval={setup / 'eval.jsonl'}", "--set", f"spaced={tmp_path / 'spaced.jsonl'}",
                 "--batch-size", "4", "--json", str(results)]) == 0
    got = json.loads(results.read_text())
    atok, gtok = Tokenizer(setup / "tokenizer.model"), Tokenizer(setup / "bpe")

    model = ComposedModel.from_composition(out / "final").eval()
    summed, tokens, hits, answers = 0.0, 0, 0, []
    with torch.no_grad():
        for row, record in enumerate(records):
            ids, mask, labels, aligned = reference_rows(records, atok, gtok, [row])
            logits = model(ids, attention_mask=mask, augmenting_inputs=[aligned]).logits  # right-padded
            s, t = reference_completion_loss(logits, labels)
            summed, tokens = summed + s, tokens + t
            reference = atok.encode(record["completion"]) + [atok.eos_id]
            new = generate_across_tokenizers(model, [record["prompt"]], atok, [gtok], use_cache=False,
                                             max_new_tokens=len(reference)).ids[0]
            hits += new[:len(reference)] == reference
            answers.append(atok.decode([t for t in new if t != atok.eos_id]))
    composed = got["composed"]["eval"]
    assert composed["n"] == 6 and composed["loss"] == pytest.approx(summed / tokens, rel=1e-5)
    assert composed["exact_match"] == pytest.approx(hits / 6)
    assert [e["got"] for e in composed["examples"]] == answers[:len(composed["examples"])]

    augmenting = AutoModelForCausalLM.from_pretrained(setup / "augmenting").eval()

    def augmenting_loss(records: list[dict], split) -> float:
        summed, tokens = 0.0, 0
        with torch.no_grad():
            for record in records:
                prompt, completion = split(gtok, record["prompt"], record["completion"])
                ids = torch.tensor([prompt + completion])
                labels = torch.tensor([[IGNORE] * len(prompt) + completion])
                s, t = reference_completion_loss(augmenting(ids).logits, labels)
                summed, tokens = summed + s, tokens + t
        return summed / tokens

    def apart(tok, prompt: str, completion: str):
        return [tok.bos_id, *tok.encode(prompt)], tok.encode(completion) + [tok.eos_id]

    for name, rows in (("eval", records), ("spaced", spaced)):
        assert got["augmenting"][name]["loss"] == pytest.approx(augmenting_loss(rows, split_by_decoding), rel=1e-5)
    assert augmenting_loss(spaced, apart) != pytest.approx(augmenting_loss(spaced, split_by_decoding), rel=1e-3)


def test_cached_states_of_each_rows_own_reading_are_the_recomputed_ones(setup_dir, tmp_path):
    """`calm-dist cache`'s layout for text read by another tokenizer: each row's states of its own tokens (F and
    the tails), stored ragged and read back right-padded, equal the augmenting model's states of the micro-batch
    the trainer builds, rows in any order, at every real token; a cache of another augmenting tokenizer is stale."""
    from calm_dist.data.aligned_rows import AlignedRows
    from calm_dist.data.prepare import load_rows
    from calm_dist.model.io import load_causal_lm
    from calm_dist.training.states_cache import CacheError, StatesCache, build_cache, components

    cfg = load_config(RECIPE, overrides(setup_dir, tmp_path / "run"))
    atok, gtok = Tokenizer(setup_dir / "tokenizer.model"), Tokenizer(setup_dir / "bpe")
    rows = AlignedRows(load_rows(cfg.data, cfg.data.train, "data.train", atok, tmp_path / "data", augmenting=[gtok]),
                       [gtok], cfg.data.augmenting_len)
    comps = components([str(setup_dir / "augmenting")], [None], [[1, 3]], rows.fingerprint, SEQ_LEN, "fp32", "fp32",
                       by_characters=True)
    build_cache(tmp_path / "cache", comps, [load_causal_lm(str(setup_dir / "augmenting"))], [[1, 3]], rows,
                rows_per_shard=12, batch_size=5, progress=False)
    cache = StatesCache(tmp_path / "cache", comps)
    cache.verify()
    model = ComposedModel.from_pretrained(str(setup_dir / "anchor"), [str(setup_dir / "augmenting")],
                                          layer_pairs=[[(1, 1), (3, 3)]])
    for indices in ([7, 30, 2, 13], [31], list(range(N_TRAIN))):
        batch = rows.batch(indices)
        (aligned,) = batch["augmenting_inputs"]
        recomputed = model.run_augmenting_each([aligned.model_inputs()])[0]
        (cached,) = cache.read(indices)
        real = aligned.attention_mask.bool()
        assert any(aligned.reading[b].any() for b in range(len(indices))) or len(indices) == 1
        for layer in (1, 3):
            assert cached[layer].shape == recomputed[layer].shape
            torch.testing.assert_close(cached[layer][real], recomputed[layer][real], atol=1e-5, rtol=0)
    other = Tokenizer(setup_dir / "tokenizer.model")  # the anchor's own as the augmenting one: other rows
    other_rows = load_rows(cfg.data, cfg.data.train, "data.train", atok, tmp_path / "data", augmenting=[other])
    with pytest.raises(CacheError, match="stale cache .*data_and_tokenization"):
        StatesCache(tmp_path / "cache", {**comps, "data_and_tokenization": other_rows.fingerprint})


def test_two_rank_zero3_with_cached_augmenting_states_matches_the_reference(setup_dir, tmp_path, reference):
    """`calm-dist cache` on 2 ranks stores each row's own reading; training on 2 ranks reads it and never loads
    the augmenting weights: the losses and weights of recomputing them, and of the reference."""
    out = tmp_path / "cached"
    common = overrides(setup_dir, out, **{"train.augmenting_states": "cached"})
    run_ranks(["-m", "calm_dist.cli", "cache", "--config", str(RECIPE), "--rows-per-shard", "12", *common],
              timeout=600)
    manifest = json.loads((out / "augmenting_cache" / "train" / "manifest.json").read_text())
    assert manifest["components"]["reading"] == "characters" and manifest["rows"] == N_TRAIN
    assert_matches(run_worker(setup_dir, out, **{"train.augmenting_states": "cached"}), out, reference)
