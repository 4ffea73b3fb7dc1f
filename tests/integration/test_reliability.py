"""Faults and bad input, with real processes: kill -9, signals, a full disk, and a table of bad inputs.

Every scenario checks what survives on disk; docs/reliability.md lists the guarantees and these tests.
"""
import io
import json
import math
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import transformers as T
from safetensors.torch import load_file

from calm_dist.files import sha256_file
from calm_dist.train import main
from calm_dist.faults import Faults

from tests.helpers.hub_cache import word_tokenizer
from tests.helpers.launch import REPO, Ranks, describe, run_ranks
from tests.helpers.required import unavailable
from tests.helpers.tiny import tiny_setup

TRAIN = str(REPO / "calm_dist" / "train.py")
RECIPE = str(REPO / "recipes" / "tiny.yaml")
STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=64, n_eval=8)


def args(tiny: Path, out: Path, **extra) -> list[str]:
    items = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
             "data.train": tiny / "train.jsonl", "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
             "data.cache_dir": tiny / "data_cache", "train.output_dir": out, "train.steps": STEPS,
             "train.micro_batch_size": 4, "train.global_batch_size": 8, "train.log_every": 1,
             "train.checkpoint_every": 2, "tracking.enabled": "false"}
    items.update(extra)
    return [TRAIN, "--config", RECIPE, *[f"{k}={v}" for k, v in items.items()]]


def losses(out: Path) -> dict[int, float]:
    """step -> loss from rank 0's metrics.jsonl (a resumed run appends; later lines win)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def final_weights(out: Path) -> dict:
    return load_file(str(out / "final" / "composition.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def baseline(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline") / "run"
    run_ranks(args(tiny, out))
    return losses(out), final_weights(out)


def resume_and_compare(tiny, out, baseline):
    run_ranks(args(tiny, out, **{"train.resume": "auto"}))
    base_losses, base_weights = baseline
    assert losses(out) == base_losses  # every step, before and after the fault, bit for bit
    assert_same_weights(final_weights(out), base_weights)


def test_the_config_and_the_environment_inject_faults_through_one_call(monkeypatch):
    """train.fail_at_step (rank 1, or rank 0 alone) and CALM_DIST_FAULT both act at Faults.at(point, step)."""
    monkeypatch.delenv("CALM_DIST_FAULT", raising=False)
    Faults(1, 2, fail_at_step=3).at("raise_in_step", 2)  # another step
    Faults(0, 2, fail_at_step=3).at("raise_in_step", 3)  # another rank
    Faults(1, 2, fail_at_step=3).at("kill_after_step", 3)  # another point
    for rank, world in ((1, 2), (0, 1)):
        with pytest.raises(RuntimeError, match=f"^train.fail_at_step=3: injected failure on rank {rank}$"):
            Faults(rank, world, fail_at_step=3).at("raise_in_step", 3)
    monkeypatch.setenv("CALM_DIST_FAULT", "raise_in_checkpoint:4:1")
    Faults(0, 2).at("raise_in_checkpoint", 4)
    with pytest.raises(RuntimeError, match="^injected fault raise_in_checkpoint:4:1 on rank 1$"):
        Faults(1, 2).at("raise_in_checkpoint", 4)
    monkeypatch.setenv("CALM_DIST_FAULT", "raise_in_step:2")  # the step point through the environment too
    with pytest.raises(RuntimeError, match="^injected fault raise_in_step:2 on rank 0$"):
        Faults(0, 2).at("raise_in_step", 2)


# What gloo raises on the surviving rank when its peer's socket goes: reset or closed, as the timing falls.
GLOO_PEER_GONE = re.compile(r"RuntimeError: \[\S*gloo/transport/\S*\] .*Connection (reset|closed) by peer")


@pytest.mark.slow
def test_kill_9_of_one_rank_fails_the_job_fast_and_resume_matches(tiny, tmp_path, baseline):
    out = tmp_path / "run"
    ranks = Ranks(args(tiny, out), env={"CALM_DIST_FAULT": "kill_after_step:5:1"})
    results = ranks.wait(timeout=300, kill_peers=False)  # rank 0 must notice on its own
    assert results[1].returncode == -signal.SIGKILL, describe(results)
    # Exit code 1 (an uncaught error), not -SIGKILL: the harness kills only what is still running at its timeout.
    assert results[0].returncode == 1, describe(results)
    assert GLOO_PEER_GONE.search(results[0].output), describe(results)
    detect_s = results[0].exited_at - results[1].exited_at
    # gloo sees the closed socket at once (~1 s here); the bound sits far below the 300 s collective timeout
    # (distributed.timeout_s), which is what a rank waiting for a dead peer without noticing would run into.
    assert detect_s < 60, f"rank 0 outlived its killed peer by {detect_s:.0f} s\n{describe(results)}"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"
    resume_and_compare(tiny, out, baseline)


@pytest.mark.slow
def test_kill_9_during_checkpoint_writing_keeps_the_previous_one(tiny, tmp_path, baseline):
    out = tmp_path / "run"
    results = Ranks(args(tiny, out), env={"CALM_DIST_FAULT": "kill_in_checkpoint:6:0"}).wait(timeout=300)
    assert results[0].returncode == -signal.SIGKILL, describe(results)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_4"
    assert (ckpt / "step_4" / "trainer_state.json").is_file() and not (ckpt / "step_6").exists()
    assert (ckpt / "step_6.tmp").exists()  # the half-written one, never published
    resume_and_compare(tiny, out, baseline)
    assert not (ckpt / "step_6.tmp").exists()  # cleaned by the next publish


@pytest.mark.slow
def test_sigterm_and_sigusr1_checkpoint_and_exit_cleanly_without_losing_a_step(tiny, tmp_path, baseline):
    out = tmp_path / "run"
    ranks = Ranks(args(tiny, out, **{"train.checkpoint_every": 0}))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not ((out / "metrics.jsonl").exists() and losses(out)):
        time.sleep(0.05)
    ranks.procs[0].send_signal(signal.SIGUSR1)  # as SLURM's --signal would
    ranks.procs[1].send_signal(signal.SIGTERM)  # as a scheduler's or torchrun's stop would
    results = ranks.wait(timeout=240)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    stopped_at = max(losses(out))
    assert stopped_at < STEPS, "the run ended before the signals arrived"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped_at}"
    assert not (out / "final").exists()
    resume_and_compare(tiny, out, baseline)


def lr_at(step: int, lr: float) -> float:
    """recipes/tiny.yaml's schedule written out by hand: 2 warmup steps, then cosine to 0.1 x lr at STEPS."""
    if step < 2:
        return lr * (step + 1) / 2
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (STEPS - 2))))


@pytest.mark.slow
def test_resume_auto_falls_back_past_a_shard_damaged_on_one_rank_and_an_allowed_lr_change_takes(
        tiny, tmp_path, baseline):
    out = tmp_path / "run"
    run_ranks(args(tiny, out, **{"train.stop_after_step": 4}))
    ckpt = out / "checkpoints"
    shard = ckpt / "step_4" / "optimizer.rank1.safetensors"  # only rank 1 reads and verifies it
    data = bytearray(shard.read_bytes())
    data[-9] ^= 0x40  # one bit of the tensor data
    shard.write_bytes(bytes(data))
    results = run_ranks(args(tiny, out, **{"train.resume": "auto"}))
    said = [line for line in results[0].output.splitlines() if line.startswith("cannot resume")]
    assert len(said) == 1 and "step_4 (rank 1: " in said[0], describe(results)
    assert "optimizer.rank1.safetensors does not match" in said[0] and said[0].endswith("from step_2 instead")
    assert f"resumed from {ckpt / 'step_2'} at step 2" in results[0].output
    base_losses, base_weights = baseline
    assert losses(out) == base_losses  # steps 3-4 run again from step_2, then on to the end, bit for bit
    assert_same_weights(final_weights(out), base_weights)

    # Resume step 10 again with another lr, allowed: the scheduler and optimizer take the NEW base lr.
    new_lr = 0.006
    run_ranks(args(tiny, out, **{"train.resume": ckpt / "step_10", "optim.lr": new_lr,
                                 "train.resume_allow_changes": "[optim.lr]"}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-2:]
    assert [r["step"] for r in rows] == [11, 12]
    assert [r["train/lr"] for r in rows] == pytest.approx([lr_at(11, new_lr), lr_at(12, new_lr)], rel=1e-12)
    assert rows[0]["train/loss"] == base_losses[11]  # step 11's loss comes from step 10's weights
    assert rows[1]["train/loss"] != base_losses[12]  # step 11's update used the new lr


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        unavailable("a tmpfs mount for the disk-full tests (root needed)", proc.stderr.strip())


@pytest.fixture
def small_disk(tmp_path):
    mounts = []

    def make(size_kb: int) -> Path:
        path = tmp_path / f"disk{len(mounts)}"
        _mount_tmpfs(path, size_kb)
        mounts.append(path)
        return path
    yield make
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _du_kb(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) // 1024 + 1


@pytest.mark.slow
def test_disk_full_while_checkpointing(tiny, tmp_path, small_disk):
    probe = tmp_path / "probe"
    run_ranks(args(tiny, probe, **{"train.stop_after_step": 2, "train.log_every": 100}), world=1)
    one_checkpoint_kb = _du_kb(probe / "checkpoints" / "step_2")
    disk = small_disk(int(one_checkpoint_kb * 1.5) + 64)  # room for one checkpoint, not two
    out = disk / "run"
    results = run_ranks(args(tiny, out, **{"train.log_every": 100}), world=1, check=False)
    assert results[0].returncode == 1, describe(results)
    error = [line for line in results[0].output.splitlines() if line.startswith("calm_dist:")]
    assert len(error) == 1 and "No space left on device" in error[0] and "step_2" in error[0], describe(results)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_2"
    assert json.loads((ckpt / "step_2" / "trainer_state.json").read_text())["step"] == 2
    assert load_file(str(ckpt / "step_2" / "composition.safetensors"))  # intact and readable
    assert not list(ckpt.glob("step_*.tmp"))  # the failed attempt was cleaned


@pytest.mark.slow
def test_disk_full_while_caching(tiny, tmp_path, small_disk):
    disk = small_disk(96)
    cmd = ["-m", "calm_dist.cli", "cache", "--rows-per-shard", "8", *args(
        tiny, tmp_path / "run", **{"train.states_cache_dir": disk / "cache"})[1:]]
    results = run_ranks(cmd, world=1, check=False)
    assert results[0].returncode == 2, describe(results)
    error = [line for line in results[0].output.splitlines() if line.startswith("calm-dist:")]
    assert len(error) == 1 and "No space left on device" in error[0], describe(results)
    train_cache = disk / "cache" / "train"
    assert not (train_cache / "manifest.json").exists()
    assert not list(train_cache.glob(".*.tmp"))
    for sidecar in train_cache.glob("shard-*.json"):  # every shard it did finish is complete and verified
        shard = sidecar.with_suffix(".safetensors")
        assert sha256_file(shard) == json.loads(sidecar.read_text())["sha256"]


# ---- bad input: one line, exit code 2, nothing on disk lost --------------------------------------------
def _bad_inputs(tiny: Path, tmp: Path) -> list[tuple[str, list[str], dict, str]]:
    """(name, overrides, env, expected message) — files the cases need are made here."""
    rows = [json.loads(line) for line in (tiny / "train.jsonl").read_text().splitlines()]
    missing = tmp / "missing_field.jsonl"
    missing.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "only a prompt"}) + "\n")
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    ds_owned = tmp / "ds_owned.json"
    ds_owned.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64}))
    ds_stage1 = tmp / "ds_stage1.json"
    ds_stage1.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    pickled = tmp / "pickled_anchor"
    pickled.mkdir(exist_ok=True)
    shutil.copy(tiny / "anchor" / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    big_vocab = tmp / "big_vocab.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([r["prompt"] + r["completion"] for r in rows] * 20),
                                   model_writer=buf, vocab_size=200, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   minloglevel=2, hard_vocab_limit=False,
                                   user_defined_symbols=[f"w{i}" for i in range(150)])
    big_vocab.write_bytes(buf.getvalue())
    other_vocab = tmp / "other_vocab_aug"  # saved with its own tokenizer, of other tokens than data.tokenizer's
    if not other_vocab.exists():
        T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=99, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0)).save_pretrained(other_vocab)
        word_tokenizer(other_vocab)
    existing = tmp / "existing_run"
    (existing / "checkpoints" / "step_2").mkdir(parents=True, exist_ok=True)
    (existing / "checkpoints" / "step_2" / "trainer_state.json").write_text('{"step": 2, "world_size": 1}')
    return _original_bad_inputs(missing, empty, ds_owned, ds_stage1, bad_yaml, pickled, big_vocab, other_vocab,
                                existing) + _bad_paths(tiny, tmp) + _bad_environment() + _out_of_range_values() \
        + _bad_deepspeed_settings(tmp)


def _bad_deepspeed_settings(tmp: Path) -> list[tuple[str, list[str], dict, str]]:
    """DeepSpeed settings a stage accepts but the run could not honour: an elastic ZeRO-2 checkpoint (resume), and
    compiled blocks under ZeRO-3's per-module hooks (the default zero3 JSON)."""
    elastic = tmp / "ds_zero2_elastic.json"
    elastic.write_text(json.dumps({"zero_optimization": {"stage": 2, "elastic_checkpoint": True}}))
    return [("ZeRO-2 elastic checkpoint", [f"distributed.deepspeed_config={elastic}"], {},
             "zero_optimization.elastic_checkpoint=true is not supported"),
            ("compiled blocks without ZeRO-3 leaves", ["train.compile=true", "distributed.zero3_leaf_blocks=false"],
             {}, "train.compile needs distributed.zero3_leaf_blocks=true under ZeRO-3")]


def _original_bad_inputs(missing, empty, ds_owned, ds_stage1, bad_yaml, pickled, big_vocab, other_vocab, existing):
    return [
        ("unknown key", ["train.stepz=3"], {}, "unknown key train.stepz"),
        ("non-numeric override", ["train.steps=ten"], {}, "train.steps: expected an integer, got 'ten'"),
        ("bad enum", ["train.precision=fp4"], {}, "train.precision: expected one of"),
        ("missing anchor", ["model.anchor=/nonexistent/anchor"], {},
         "model.anchor: /nonexistent/anchor does not exist"),
        ("missing train data", ["data.train=/nonexistent.jsonl"], {}, "data.train: /nonexistent.jsonl does not exist"),
        ("layer out of range", ["model.layer_pairs=[[[1,7]]]"], {}, "anchor layer 7 is out of range"),
        ("batch vs world", ["train.global_batch_size=6"], {"WORLD_SIZE": "2"},
         "global_batch_size=6 is not a multiple of micro_batch_size x world size = 4 x 2"),
        ("row missing a field", [f"data.train={missing}"], {},
         f"data.train: {missing} row 2: field 'completion' is missing"),
        ("over-long row", ["data.seq_len=8"], {}, "more than data.seq_len=8"),
        ("empty data set", [f"data.train={empty}"], {}, f"data.train: {empty} is empty: it holds no records"),
        ("tokenizer mismatch", [f"data.tokenizer={big_vocab}"], {}, "data.tokenizer does not match the anchor"),
        ("vocabulary mismatch", [f"model.augmenting=[{other_vocab}]"], {},
         "model.augmenting[0]'s tokenizer (" + str(other_vocab) + ") is another tokenizer than data.tokenizer"),
        ("missing resume path", ["train.resume=/nonexistent/step_9"], {}, "not a checkpoint directory"),
        ("DeepSpeed JSON owns a batch key", [f"distributed.deepspeed_config={ds_owned}"], {},
         "sets train_batch_size"),
        ("ZeRO stage 1", [f"distributed.deepspeed_config={ds_stage1}"], {}, "calm_dist trains under ZeRO stage 2 "),
        ("pickled weights", [f"model.anchor={pickled}"], {}, "holds no safetensors weights"),
        ("existing checkpoints, no resume", [f"train.output_dir={existing}"], {}, "already holds checkpoints"),
        ("invalid YAML", ["--config-file", str(bad_yaml)], {}, "is not valid YAML"),
    ]


def _bad_paths(tiny: Path, tmp: Path) -> list[tuple[str, list[str], dict, str]]:
    """Files and directories that exist but cannot serve: the config file, data, tokenizer, outputs, models."""
    latin1 = tmp / "latin1.yaml"
    latin1.write_bytes("train:\n  steps: 5  # café\n".encode("latin-1"))
    not_a_dataset = tmp / "not_a_dataset"
    not_a_dataset.mkdir(exist_ok=True)
    (not_a_dataset / "notes.txt").write_text("no data here")
    empty_tokenizer = tmp / "empty_tokenizer"
    empty_tokenizer.mkdir(exist_ok=True)
    empty_model = tmp / "empty.model"
    empty_model.write_bytes(b"")
    a_file = tmp / "a_file"
    a_file.write_text("a regular file")
    latin1_ds = tmp / "latin1_ds.json"
    latin1_ds.write_bytes('{"zero_optimization": {"stage": 3}, "comment": "café"}'.encode("latin-1"))
    short_augmenting = tmp / "short_positions_augmenting"  # 16 positions, under the recipe's seq_len of 32
    shutil.copytree(tiny / "augmenting", short_augmenting, dirs_exist_ok=True)
    config = json.loads((short_augmenting / "config.json").read_text())
    (short_augmenting / "config.json").write_text(json.dumps({**config, "n_positions": 16}))
    return [
        ("non-UTF-8 config file", ["--config-file", str(latin1)], {}, f"config file {latin1} is not UTF-8 text: "
         "byte 0xe9"),
        ("non-UTF-8 DeepSpeed JSON", [f"distributed.deepspeed_config={latin1_ds}"], {},
         f"distributed.deepspeed_config: {latin1_ds} is not UTF-8 text: byte 0xe9"),
        ("stop_after_step at or after the last step", ["train.stop_after_step=12"], {},
         "train.stop_after_step=12 is not before train.steps=12"),
        ("data.train empty", ["data.train="], {}, "data.train is not set"),
        ("data.eval empty", ["data.eval="], {}, "data.eval is not set"),
        ("data.train a directory without data", [f"data.train={not_a_dataset}"], {},
         f"data.train: {not_a_dataset} holds .txt files, which are not data files"),
        ("empty tokenizer directory", [f"data.tokenizer={empty_tokenizer}"], {},
         f"data.tokenizer: {empty_tokenizer} is an empty directory"),
        ("empty .model file", [f"data.tokenizer={empty_model}"], {}, f"data.tokenizer: {empty_model} is an empty file"),
        ("output_dir under a regular file", [f"train.output_dir={a_file}/run"], {},
         f"train.output_dir={a_file}/run: {a_file} is a file, not a directory"),
        ("data.cache_dir under a regular file", [f"data.cache_dir={a_file}/cache"], {},
         f"data.cache_dir={a_file}/cache: {a_file} is a file, not a directory"),
        ("seq_len beyond the anchor's positions", ["data.seq_len=600"], {},
         "data.seq_len=600 exceeds model.anchor's position limit (max_position_embeddings=512)"),
        ("seq_len beyond an augmenting model's positions", [f"model.augmenting=[{short_augmenting}]"], {},
         "data.seq_len=32 exceeds model.augmenting[0]'s position limit (max_position_embeddings=16)"),
        ("MLflow URI scheme", ["tracking.enabled=true", "tracking.tracking_uri=ftp://127.0.0.1/mlruns"], {},
         "tracking.tracking_uri=ftp://127.0.0.1/mlruns: MLflow has no tracking store for the scheme 'ftp'"),
        ("MLflow URI scheme from the environment", ["tracking.enabled=true"],
         {"MLFLOW_TRACKING_URI": "mlflow://127.0.0.1:5000"},
         "$MLFLOW_TRACKING_URI=mlflow://127.0.0.1:5000: MLflow has no tracking store for the scheme 'mlflow'"),
    ]


def _bad_environment() -> list[tuple[str, list[str], dict, str]]:
    return [
        ("RANK not a number", [], {"RANK": "abc"}, "RANK='abc' is not a non-negative integer"),
        ("WORLD_SIZE not a number", [], {"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a non-negative"),
        ("RANK outside the world", [], {"RANK": "2", "WORLD_SIZE": "2"},
         "RANK=2 is outside the world of WORLD_SIZE=2 ranks"),
    ]


# (override, message): one numeric field out of its range each, every section of the config tree.
OUT_OF_RANGE = [
    ("model.every=0", "model.every must be >= 1, got 0"),
    ("model.num_heads=0", "model.num_heads must be >= 1, got 0"),
    ("model.num_heads=-2", "model.num_heads must be >= 1, got -2"),
    ("model.lora_rank=0", "model.lora_rank must be >= 1, got 0"),
    ("data.seq_len=0", "data.seq_len must be >= 1, got 0"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr=.nan", "optim.lr: expected a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: expected a finite number, got inf"),
    ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.betas=[0.9,0.95,0.99]", "optim.betas must be two numbers [beta1, beta2], got [0.9, 0.95, 0.99]"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers [beta1, beta2], got [0.9]"),
    ("optim.betas=[0.9,1.0]", "optim.betas[1] must be in [0, 1), got 1.0"),
    ("optim.betas=[-0.1,0.95]", "optim.betas[0] must be in [0, 1), got -0.1"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
    ("optim.min_lr_ratio=7", "optim.min_lr_ratio must be in [0, 1], got 7.0"),
    ("optim.min_lr_ratio=-0.5", "optim.min_lr_ratio must be in [0, 1], got -0.5"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1, got 0"),
    ("train.global_batch_size=0", "train.global_batch_size must be >= 1, got 0"),
    ("train.seed=-1", "train.seed must be in [0, 4294967296), got -1"),
    ("train.seed=4294967296", "train.seed must be in [0, 4294967296), got 4294967296"),
    ("train.log_every=0", "train.log_every must be >= 1, got 0"),
    ("train.eval_every=-5", "train.eval_every must be >= 0, got -5"),
    ("train.eval_batches=-1", "train.eval_batches must be >= 0, got -1"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0, got -1"),
    ("train.keep_last=0", "train.keep_last must be >= 1, got 0"),
    ("train.peak_tflops_per_rank=0", "train.peak_tflops_per_rank must be > 0, got 0.0"),
    ("train.stop_after_step=0", "train.stop_after_step must be >= 1, got 0"),
    ("train.fail_at_step=-1", "train.fail_at_step must be >= 0, got -1"),
    ("distributed.timeout_s=0", "distributed.timeout_s must be > 0, got 0"),
    ("tracking.retry_interval_s=0", "tracking.retry_interval_s must be > 0, got 0.0"),
    ("tracking.flush_budget_s=-1", "tracking.flush_budget_s must be >= 0, got -1.0"),
]


def _out_of_range_values() -> list[tuple[str, list[str], dict, str]]:
    return [(override, [override], {}, message) for override, message in OUT_OF_RANGE]


def test_bad_inputs_get_one_clear_line_and_exit_2(tiny, tmp_path, monkeypatch, capsys):
    """In-process through train.py's main (the subprocess path is covered by test_config.py and below)."""
    cases = _bad_inputs(tiny, tmp_path)
    assert len(cases) == len({name for name, *_ in cases}) >= 45
    cwd = tmp_path / "cwd"  # an empty working directory: a path that falls back to "." names nothing else
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    failures = []
    for name, overrides, env, message in cases:
        out = tmp_path / "runs" / name.replace(" ", "_")
        out.mkdir(parents=True)
        sentinel = out / "keep.txt"
        sentinel.write_text("user data")
        argv = args(tiny, out)
        if overrides and overrides[0] == "--config-file":
            argv[2] = overrides[1]
            overrides = []
        extra = {k.split("=")[0]: k for k in overrides}
        argv = [a for a in argv if a.split("=")[0] not in extra] + overrides
        with monkeypatch.context() as m:
            # Recorded, then removed: what a row that wrongly trains exports (DistEnv.export) is undone with it.
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "MLFLOW_TRACKING_URI"):
                m.setenv(key, "")
                m.delenv(key)
            for key, value in {**({"RANK": "0"} if "WORLD_SIZE" in env else {}), **env}.items():
                m.setenv(key, value)
            before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
            paths_before = set(tmp_path.rglob("*"))
            try:
                code = main(argv[1:])
            except (Exception, SystemExit) as e:  # a traceback is this row's failure; the table goes on
                code = f"{type(e).__name__}: {e}"
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("calm_dist:")]
        ok = code == 2 and len(lines) == 1 and message in lines[0]
        lost = [str(p) for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
        lost += [f"new: {p}" for p in sorted(set(tmp_path.rglob("*")) - paths_before)]
        if not ok or lost or sentinel.read_text() != "user data":
            failures.append(f"{name}: exit {code}, lines {lines}, lost {lost}\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_cached_states_never_built_is_refused_before_loading_weights(tiny, tmp_path):
    results = run_ranks(args(tiny, tmp_path / "run", **{"train.augmenting_states": "cached"}), world=1, check=False)
    lines = [line for line in results[0].output.splitlines() if line.startswith("calm_dist:")]
    assert results[0].returncode == 2 and len(lines) == 1 and "no complete cache" in lines[0], describe(results)
