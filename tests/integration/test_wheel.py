"""The wheel works outside the repository: built from a copy of the sources, installed with --no-deps into a
fresh venv that reuses this environment's installed dependencies, it trains the shipped `tiny` recipe with the
shipped `zero3` DeepSpeed JSON from a directory that is not the checkout."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.launch import REPO

SOURCES = ("pyproject.toml", "README.md", "calm_dist", "ds_configs", "recipes")


def run(argv, cwd, env, timeout=300) -> str:
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv}:\n{(proc.stdout + proc.stderr)[-6000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_installed_wheel_trains_the_tiny_recipe_from_another_directory(tmp_path):
    # Build from a copy: the build writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         src], tmp_path, env)
    wheel, = (tmp_path / "dist").glob("calm_dist-*.whl")

    # A fresh venv whose own site-packages holds only the wheel; a path line in a .pth file appends this
    # environment's site-packages (torch, deepspeed, ...) after it. A plain path line runs none of that
    # directory's own .pth files, so the checkout's editable install stays out of sight.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    imported = run([python, "-c", "import calm_dist; print(calm_dist.__file__)"], work, env).strip()
    assert Path(imported).is_relative_to(site), imported

    run([python, "-m", "calm_dist.tiny_setup", "--out", "artifacts/tiny"], work, env)  # the recipe's inputs
    out = run([venv / "bin" / "calm-dist", "train", "--config", "tiny", "train.steps=2", "train.log_every=1",
               "tracking.enabled=false"], work, env)
    assert "done: step 2" in out
    assert (work / "runs" / "tiny" / "final" / "composition.safetensors").is_file()
