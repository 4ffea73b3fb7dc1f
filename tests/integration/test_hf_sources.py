"""`hf:` sources offline: a Hugging Face datasets cache laid out here, with no network, the way `load_dataset`
leaves it after loading a hub dataset (<cache>/<org>___<name>/<config>/<version>/<commit>/), is found by name
with HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1; a local dataset repository (data files and a README.md with
`configs`) loads by path; an uncached name, an uncached revision or config, an unknown split is one line.

Each check runs in a fresh process: `datasets` reads the offline switches and the cache location at import."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
SPLITS = {"train": 7, "test": 3}

# Builds what loading the hub dataset org/<name> online leaves in the cache: its data files converted by the
# packaged json builder into <name>-<split>.arrow with dataset_info.json, in the directory of config and commit.
# (The builder refuses local data files for a hub repo_id, so it writes under a scratch root and the result is
# moved to the hub dataset's place.)
BUILD = """
import json, os, shutil, sys
from datasets.packaged_modules.json.json import Json

cache, scratch, data, name, config, commit = sys.argv[1:7]
files = {split: os.path.join(data, f"{config}-{split}.jsonl") for split in json.loads(sys.argv[7])}
builder = Json(cache_dir=scratch, dataset_name=name, config_name=config, hash=commit, data_files=files)
builder.download_and_prepare()
target = os.path.join(cache, f"org___{name}", config, "0.0.0", commit)
os.makedirs(os.path.dirname(target), exist_ok=True)
shutil.move(builder.cache_dir, target)
"""

# Opens each source and reports what a user of sources.py sees: records, row numbers, fingerprint, or the error.
OPEN = """
import json, sys
from calm_dist.config import ConfigError
from calm_dist.data.sources import open_source, source_fingerprint

out = {}
for spec in json.loads(sys.argv[1]):
    try:
        (part,) = open_source(spec, "data.train")
        part.batch_rows = 2
        out[spec] = {"name": part.name, "rows": part.num_rows(), "records": [r for _, r in part.records()],
                     "range": list(part.records(1, 4)), "fingerprint": source_fingerprint(spec, "data.train")}
    except ConfigError as e:
        out[spec] = {"error": str(e)}
print("RESULT " + json.dumps(out))
"""


def records(config: str, split: str) -> list[dict]:
    return [{"text": f"{config} {split} {i}", "i": i} for i in range(SPLITS[split])]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run(script: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def offline(tmp_path_factory) -> dict:
    """An offline environment whose datasets cache holds org/tiny-set (config "default", splits train and test,
    at COMMIT) and org/langs (configs "en" and "fr", split train)."""
    root = tmp_path_factory.mktemp("hf")
    env = {**os.environ, "HF_HOME": str(root / "home"), "HF_DATASETS_CACHE": str(root / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    data = root / "data"
    for name, config, splits in (("tiny-set", "default", ["train", "test"]), ("langs", "en", ["train"]),
                                 ("langs", "fr", ["train"])):
        for split in splits:
            write_jsonl(data / f"{config}-{split}.jsonl", records(config, split))
        done = run(BUILD, str(root / "cache"), str(root / "scratch"), str(data), name, config, COMMIT,
                   json.dumps(splits), env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    return env


def open_sources(specs: list[str], env: dict) -> dict:
    done = run(OPEN, json.dumps(specs), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(result[-1][len("RESULT "):])


def test_a_cached_hub_dataset_loads_offline_by_name(offline):
    specs = ["hf:org/tiny-set", "hf:org/tiny-set?split=test", f"hf:org/tiny-set?split=test&revision={COMMIT}",
             "hf:org/langs?config=fr", "hf:org/langs?config=en&split=train"]
    got = open_sources(specs, offline)
    expected = {specs[0]: ("default", "train"), specs[1]: ("default", "test"), specs[2]: ("default", "test"),
                specs[3]: ("fr", "train"), specs[4]: ("en", "train")}
    for spec, (config, split) in expected.items():
        assert "error" not in got[spec], got[spec]
        assert got[spec]["records"] == records(config, split)
        assert got[spec]["rows"] == SPLITS[split]
        assert got[spec]["range"] == [[i + 2, r] for i, r in enumerate(records(config, split)[1:4])]
    assert got[specs[0]]["name"] == "hf:org/tiny-set (split train)"
    assert got[specs[3]]["name"] == "hf:org/langs (config fr, split train)"
    prints = [got[s]["fingerprint"] for s in specs]
    assert len(set(prints)) == len(prints) and all(len(p) == 16 for p in prints)
    again = open_sources(specs[:2], offline)  # another process: the same content, the same fingerprint
    assert [again[s]["fingerprint"] for s in specs[:2]] == prints[:2]


def test_what_the_cache_cannot_answer_offline_is_one_line(offline):
    specs = ["hf:org/missing", f"hf:org/tiny-set?revision={OTHER_COMMIT}", "hf:org/tiny-set?split=validation",
             "hf:org/tiny-set?config=nope", "hf:org/langs"]
    got = open_sources(specs, offline)
    errors = {spec: got[spec].get("error") for spec in specs}
    assert all(e and "\n" not in e and e.startswith("data.train: hf:") for e in errors.values()), errors
    cache = offline["HF_DATASETS_CACHE"]
    assert errors[specs[0]] == (f"data.train: hf:org/missing is not in the Hugging Face cache ({cache}) and the hub "
                                "is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): load it once with network "
                                "access, or name a cached dataset")
    assert errors[specs[1]] == (f"data.train: hf:org/tiny-set (split train, revision {OTHER_COMMIT}): the Hugging "
                                f"Face cache holds revision {COMMIT}, not {OTHER_COMMIT}, and the hub is offline")
    assert errors[specs[2]].startswith("data.train: hf:org/tiny-set (split validation): cannot load it: ")
    assert "validation" in errors[specs[2]] and "train" in errors[specs[2]]
    assert errors[specs[3]].startswith("data.train: hf:org/tiny-set (config nope, split train): cannot load it: ")
    assert errors[specs[4]].startswith("data.train: hf:org/langs (split train): cannot load it: ")
    assert "en" in errors[specs[4]] and "fr" in errors[specs[4]]


def test_a_local_dataset_repository_loads_by_path(offline, tmp_path):
    repo = tmp_path / "repo"
    for config in ("en", "fr"):
        for split in SPLITS:
            write_jsonl(repo / config / f"{split}.jsonl", records(config, split))
    (repo / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: en
          data_files:
          - split: train
            path: en/train.jsonl
          - split: test
            path: en/test.jsonl
        - config_name: fr
          data_files:
          - split: train
            path: fr/train.jsonl
          - split: test
            path: fr/test.jsonl
        ---
        A dataset repository on disk.
        """))
    specs = [f"hf:{repo}?config=fr&split=test", f"hf:{repo}?config=en"]
    got = open_sources(specs, offline)
    assert got[specs[0]]["records"] == records("fr", "test")
    assert got[specs[1]]["records"] == records("en", "train")
    assert got[specs[0]]["name"] == f"hf:{repo} (config fr, split test)"
