"""Models on disk: loading a decoder LM (safetensors only, never a pickle) and the randomly initialised augmenting
models of the ablation, written once per output directory so that evaluation loads the very weights that trained."""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM


def load_causal_lm(name_or_path: str, revision: str | None = None, dtype=None, trust_remote_code: bool = False):
    # safetensors only: a pickled checkpoint (.bin) is refused rather than unpickled
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def write_random_augmenting(path: str, seed: int, target: Path) -> None:
    """A randomly initialised model of `path`'s architecture, seeded, saved to `target`. Written aside, then renamed:
    a process killed while saving leaves no directory that looks complete."""
    from calm_dist.model.baselines import random_augmenting  # here: baselines imports composition, which imports io

    model = random_augmenting(AutoConfig.from_pretrained(path), seed=seed)
    staged = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete directory (no config.json) would block the rename
    staged.rename(target)
