"""The shipped DeepSpeed JSONs and recipes: found by name or by their repository path from any directory, and
declared as package data (the wheel itself: tests/integration/test_wheel.py)."""
from pathlib import Path

import pytest
from setuptools import find_packages

from calm_dist.config import ConfigError, load_config
from calm_dist.shipped import find_shipped, shipped_names

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working directory outside the repository."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("value, kind, expected", [
    ("zero3", "ds_configs", "ds_configs/zero3.json"),
    ("zero3_offload.json", "ds_configs", "ds_configs/zero3_offload.json"),
    ("ds_configs/zero3_hpz.json", "ds_configs", "ds_configs/zero3_hpz.json"),
    ("tiny", "recipes", "recipes/tiny.yaml"),
    ("recipes/tiny.yaml", "recipes", "recipes/tiny.yaml"),
])
def test_shipped_files_are_found_by_name_or_repository_path_from_any_directory(elsewhere, value, kind, expected):
    assert find_shipped(value, kind) == REPO / expected


def test_a_file_in_the_working_directory_wins_and_an_unknown_name_comes_back_unchanged(elsewhere):
    (elsewhere / "zero3.json").write_text("{}")
    assert find_shipped("zero3.json", "ds_configs") == Path("zero3.json")
    assert find_shipped("zero9", "ds_configs") == Path("zero9")
    assert find_shipped("other/zero3.json", "ds_configs") == Path("other/zero3.json")


def test_recipes_load_by_name_and_a_missing_one_names_the_shipped_ones(elsewhere):
    cfg = load_config("tiny", ["train.steps=3"])
    assert cfg.train.steps == 3 and cfg.distributed.deepspeed_config == "zero3"
    with pytest.raises(ConfigError, match=r"^config file tinny does not exist \(shipped recipes: tiny\)$"):
        load_config("tinny")


def test_the_shipped_names():
    assert shipped_names("ds_configs") == ["zero2", "zero3", "zero3_hpz", "zero3_offload", "zero3_small_models"]
    assert "tiny" in shipped_names("recipes")


def test_pyproject_ships_every_package_and_both_folders():
    """The package list is explicit (a folder is mapped into the package), so a new subpackage must be named."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == set(find_packages(REPO, include=["calm_dist*"])) | {
        "calm_dist.ds_configs", "calm_dist.recipes"}
    assert setuptools["package-dir"] == {"calm_dist.ds_configs": "ds_configs", "calm_dist.recipes": "recipes"}
    assert setuptools["package-data"] == {"calm_dist.ds_configs": ["*.json"], "calm_dist.recipes": ["*.yaml"],
                                          "calm_dist.planning": ["cpu_profile.json"]}  # `plan --hardware cpu`
