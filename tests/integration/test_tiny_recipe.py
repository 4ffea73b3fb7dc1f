"""The tiny recipe on 2 ZeRO-3 ranks reproduces the losses recorded before the package was restructured
(tests/fixtures/tiny_recipe_losses.json): every step's loss, the eval loss and the exported weights.

A change that is meant to leave training alone (moving code, a new data path) must keep these bits. The figures
are exact for the CPU kernels they were recorded with (torch's CPU capability and version, in the fixture);
elsewhere float reductions may round differently, so another machine compares to 1e-5 relative and skips the
weights' hash."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

from calm_dist.tiny_setup import make_tiny_setup
from tests.helpers.launch import REPO, Ranks, describe

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_recipe_losses.json"


@pytest.mark.slow
def test_tiny_recipe_reproduces_the_recorded_losses_and_weights(tmp_path):
    recorded = json.loads(FIXTURE.read_text())
    tiny = make_tiny_setup(tmp_path / "tiny")
    out = tmp_path / "run"
    overrides = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
                 "data.train": tiny / "train.jsonl", "data.eval": tiny / "eval.jsonl",
                 "data.tokenizer": tiny / "tokenizer.model", "data.cache_dir": tmp_path / "cache",
                 "train.output_dir": out, "train.log_every": 1, "tracking.enabled": "false"}
    argv = [str(REPO / "calm_dist" / "train.py"), "--config", str(REPO / "recipes" / "tiny.yaml"),
            *[f"{k}={v}" for k, v in overrides.items()]]
    results = Ranks(argv, world=recorded["recorded_with"]["world_size"]).wait(timeout=600)
    assert [r.returncode for r in results] == [0, 0], describe(results)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_loss = [r["train/loss"] for r in rows if "train/loss" in r]
    eval_loss = [r["eval/loss"] for r in rows if "eval/loss" in r]
    same_kernels = (torch.backends.cpu.get_cpu_capability() == recorded["recorded_with"]["cpu_capability"]
                    and torch.__version__ == recorded["recorded_with"]["torch"])
    if same_kernels:
        assert train_loss == recorded["train_loss"]
        assert eval_loss == recorded["eval_loss"]
        weights = out / "final" / "composition.safetensors"
        assert hashlib.sha256(weights.read_bytes()).hexdigest() == recorded["export_sha256"]
    else:
        assert train_loss == pytest.approx(recorded["train_loss"], rel=1e-5)
        assert eval_loss == pytest.approx(recorded["eval_loss"], rel=1e-5)
