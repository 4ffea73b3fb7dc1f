"""Preflight with an augmenting model of another tokenizer (data.different_tokenizers): refused without the opt-in,
saying how to opt in; accepted with it, the data prepared with each record's text; a tokenizer without character
offsets (a slow transformers tokenizer) refused with one line and exit code 2 before anything is written;
`calm-dist cache --estimate` counts the augmenting rows' own length."""
import json
import subprocess
import sys

import pytest

from calm_dist.config import ConfigError, load_config
from calm_dist.planning import costs
from calm_dist.tiny_setup import make_tiny_setup
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.preflight import data_cache_dir, preflight
from calm_dist.training.states_cache import estimate
from tests.helpers.launch import REPO, base_env
from tests.helpers.tokenizers import byte_level_bpe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = make_tiny_setup(tmp_path_factory.mktemp("tiny"), n_train=16, n_eval=4)
    byte_level_bpe(out / "bpe", 60)  # the GPT-2 augmenting model's table (the anchor tokenizer's 70 rows) holds it
    return out


def overrides(tiny, out, *extra) -> list[str]:
    return [f"model.anchor={tiny / 'anchor'}", f"model.augmenting=[{tiny / 'augmenting'}]",
            f"data.train={tiny / 'train.jsonl'}", f"data.eval={tiny / 'eval.jsonl'}",
            f"data.tokenizer={tiny / 'tokenizer.model'}", f"data.augmenting_tokenizers=[{tiny / 'bpe'}]",
            f"train.output_dir={out}", "tracking.enabled=false", "train.steps=2", *extra]


def slow_tokenizer(directory) -> None:
    """A transformers tokenizer with no fast form (CTRL's BPE): it gives no character offsets."""
    from transformers import CTRLTokenizer

    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    CTRLTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), bos_token="<s>",
                  eos_token="</s>").save_pretrained(directory)


def test_another_tokenizer_is_refused_without_the_opt_in_and_read_by_characters_with_it(tiny, tmp_path):
    with pytest.raises(ConfigError, match="is another tokenizer than data.tokenizer .* or set "
                                          "data.different_tokenizers=true to align them by characters"):
        preflight(load_config(str(REPO / "recipes" / "tiny.yaml"), overrides(tiny, tmp_path / "a")),
                  DistEnv(0, 0, 1, 1))
    cfg = load_config(str(REPO / "recipes" / "tiny.yaml"),
                      overrides(tiny, tmp_path / "b", "data.different_tokenizers=true", "data.augmenting_seq_len=96"))
    resolved = preflight(cfg, DistEnv(0, 0, 1, 1))
    prepared = sorted(data_cache_dir(cfg).glob("tokens-*/shard-00000.text.json"))
    assert len(prepared) == 2  # data.train's and data.eval's texts
    # `calm-dist cache --estimate`: the augmenting rows' own length, 96 for the anchor's 32, per anchor token
    estimated = estimate(cfg, resolved, flops_per_s=1e11, read_bytes_per_s=1e9, write_bytes_per_s=5e8)
    per_token = costs.cache_bytes_per_token(resolved.augmenting_configs, resolved.layer_pairs,
                                            dtype=cfg.train.states_dtype)
    assert estimated["bytes_per_token"] == pytest.approx(costs.augmenting_tokens_per_token(32, 96) * per_token)
    assert costs.augmenting_tokens_per_token(32, 96) == 3  # no tails estimated: the anchor's tokens are coarser


def test_a_tokenizer_without_offsets_is_refused_with_one_line_and_exit_code_2(tiny, tmp_path):
    slow_tokenizer(tmp_path / "slow")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "calm_dist" / "train.py"), "--config",
                           str(REPO / "recipes" / "tiny.yaml"),
                           *overrides(tiny, out, "data.different_tokenizers=true",
                                      f"data.augmenting_tokenizers=[{tmp_path / 'slow'}]")],
                          env=base_env(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("calm_dist:")]
    assert len(lines) == 1 and "data.augmenting_tokenizers[0]" in lines[0] and \
        "is a slow tokenizer, which gives no character offsets" in lines[0], proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "data_cache").exists()  # nothing prepared, nothing written
