"""A 2-rank ZeRO-3 run on a mixture of two training sources: each source is prepared once, every global batch
holds its quota of each, and each source's share of the loss tokens is logged at every step."""
import json

import pytest

from calm_dist.tiny_setup import make_tiny_setup
from tests.helpers.launch import REPO, Ranks, describe


@pytest.mark.slow
def test_a_weighted_mixture_trains_and_logs_each_sources_share(tmp_path):
    tiny = make_tiny_setup(tmp_path / "tiny")
    lines = (tiny / "train.jsonl").read_text().splitlines()
    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "part.jsonl").write_text("\n".join(lines[:192]) + "\n")
    (tmp_path / "replay.jsonl").write_text("\n".join(lines[192:]) + "\n")
    sources = f"[{{source: {tmp_path / 'main'}, weight: 3}}, {{source: {tmp_path / 'replay.jsonl'}, weight: 1}}]"
    out = tmp_path / "run"
    overrides = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
                 "data.train": sources, "data.eval": "null", "data.tokenizer": tiny / "tokenizer.model",
                 "data.cache_dir": tmp_path / "cache", "train.output_dir": out, "train.steps": 4,
                 "train.log_every": 1, "tracking.enabled": "false"}
    argv = [str(REPO / "calm_dist" / "train.py"), "--config", str(REPO / "recipes" / "tiny.yaml"),
            *[f"{k}={v}" for k, v in overrides.items()]]
    results = Ranks(argv).wait(timeout=600)
    assert [r.returncode for r in results] == [0, 0], describe(results)
    assert (f"data.train mixture, every global batch: data.train[0] ({tmp_path / 'main'}): 12 of 16 rows, "
            f"data.train[1] ({tmp_path / 'replay.jsonl'}): 4 of 16 rows") in results[0].output, describe(results)
    assert len(list((tmp_path / "cache").glob("tokens-*/manifest.json"))) == 2  # each source prepared on its own
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 4
    for r in steps:
        shares = r["train/share_source_0"], r["train/share_source_1"]
        assert sum(shares) == pytest.approx(1.0) and 0.5 < shares[0] < 0.95  # 12 rows of 16 come from source 0
