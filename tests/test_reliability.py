"""Faults and bad input, with real processes: kill -9, signals, a full disk, and a table of bad inputs.

Every scenario checks what survives on disk; docs/reliability.md lists the guarantees and these tests.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launch import REPO, Ranks, describe, run_ranks

TRAIN = str(REPO / "calm_dist" / "train.py")
RECIPE = str(REPO / "recipes" / "tiny.yaml")
STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import tiny_setup

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


@pytest.mark.slow
def test_kill_9_of_one_rank_fails_the_job_fast_and_resume_matches(tiny, tmp_path, baseline):
    out = tmp_path / "run"
    ranks = Ranks(args(tiny, out), env={"CALM_DIST_FAULT": "kill_after_step:5:1"})
    results = ranks.wait(timeout=300, kill_peers=False)  # rank 0 must notice on its own
    assert results[1].returncode == -signal.SIGKILL, describe(results)
    assert results[0].returncode not in (0, None), describe(results)
    detect_s = results[0].exited_at - results[1].exited_at
    print(f"rank 0 exited {detect_s:.1f} s after rank 1 was killed")
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


def _mount_tmpfs(path: Path, size_kb: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs (root needed) for the disk-full test: {proc.stderr}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")


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
    from calm_dist.augmenter_cache import sha256_file

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
    ds_stage2 = tmp / "ds_stage2.json"
    ds_stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    pickled = tmp / "pickled_anchor"
    pickled.mkdir(exist_ok=True)
    shutil.copy(tiny / "anchor" / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    import io

    import sentencepiece as spm

    big_vocab = tmp / "big_vocab.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([r["prompt"] + r["completion"] for r in rows] * 20),
                                   model_writer=buf, vocab_size=200, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   minloglevel=2, hard_vocab_limit=False,
                                   user_defined_symbols=[f"w{i}" for i in range(150)])
    big_vocab.write_bytes(buf.getvalue())
    other_vocab = tmp / "other_vocab_aug"
    if not other_vocab.exists():
        import transformers as T

        T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=99, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=0)).save_pretrained(other_vocab)
    existing = tmp / "existing_run"
    (existing / "checkpoints" / "step_2").mkdir(parents=True, exist_ok=True)
    (existing / "checkpoints" / "step_2" / "trainer_state.json").write_text('{"step": 2, "world_size": 1}')
    return [
        ("unknown key", ["train.stepz=3"], {}, "unknown key train.stepz"),
        ("non-numeric override", ["train.steps=ten"], {}, "train.steps: expected an integer, got 'ten'"),
        ("bad enum", ["train.precision=fp4"], {}, "train.precision: expected one of"),
        ("missing anchor", ["model.anchor=/nonexistent/anchor"], {}, "model.anchor: /nonexistent/anchor does not exist"),
        ("missing train data", ["data.train=/nonexistent.jsonl"], {}, "data.train: /nonexistent.jsonl does not exist"),
        ("layer out of range", ["model.layer_pairs=[[[1,7]]]"], {}, "anchor layer 7 is out of range"),
        ("batch vs world", ["train.global_batch_size=6"], {"WORLD_SIZE": "2"},
         "global_batch_size=6 is not a multiple of micro_batch_size x world size = 4 x 2"),
        ("row missing a field", [f"data.train={missing}"], {}, "data row 1: field 'completion' is missing"),
        ("over-long row", ["data.seq_len=8"], {}, "more than data.seq_len=8"),
        ("empty data set", [f"data.train={empty}"], {}, "the data set is empty"),
        ("tokenizer mismatch", [f"data.tokenizer={big_vocab}"], {}, "data.tokenizer does not match the anchor"),
        ("vocabulary mismatch", [f"model.augmenting=[{other_vocab}]"], {}, "does not share the anchor's vocabulary"),
        ("missing resume path", ["train.resume=/nonexistent/step_9"], {}, "not a checkpoint directory"),
        ("DeepSpeed JSON owns a batch key", [f"distributed.deepspeed_config={ds_owned}"], {},
         "sets train_batch_size"),
        ("ZeRO stage 2", [f"distributed.deepspeed_config={ds_stage2}"], {}, "calm_dist trains under ZeRO stage 3"),
        ("pickled weights", [f"model.anchor={pickled}"], {}, "holds no safetensors weights"),
        ("existing checkpoints, no resume", [f"train.output_dir={existing}"], {}, "already holds checkpoints"),
        ("invalid YAML", ["--config-file", str(bad_yaml)], {}, "is not valid YAML"),
    ]


def test_bad_inputs_get_one_clear_line_and_exit_2(tiny, tmp_path, monkeypatch, capsys):
    """In-process through train.py's main (the subprocess path is covered by test_config.py and below)."""
    from calm_dist.train import main

    cases = _bad_inputs(tiny, tmp_path)
    assert len(cases) >= 15
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
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                m.delenv(key, raising=False)
            if env.get("WORLD_SIZE"):
                m.setenv("WORLD_SIZE", env["WORLD_SIZE"])
                m.setenv("RANK", "0")
            before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
            code = main(argv[1:])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("calm_dist:")]
        ok = code == 2 and len(lines) == 1 and message in lines[0]
        lost = [str(p) for p, t in before.items() if not p.exists() or p.stat().st_mtime_ns != t]
        if not ok or lost or sentinel.read_text() != "user data":
            failures.append(f"{name}: exit {code}, lines {lines}, lost {lost}\n{err[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.slow
def test_cached_states_never_built_is_refused_before_loading_weights(tiny, tmp_path):
    results = run_ranks(args(tiny, tmp_path / "run", **{"train.augmenting_states": "cached"}), world=1, check=False)
    lines = [line for line in results[0].output.splitlines() if line.startswith("calm_dist:")]
    assert results[0].returncode == 2 and len(lines) == 1 and "no complete cache" in lines[0], describe(results)
