"""Models on disk: loading a decoder LM (a directory or a hub id; safetensors only, never a pickle) and the
randomly initialised augmenting models of the ablation, written once per output directory so that evaluation
loads the very weights that trained."""
from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from calm_dist.model.fused_kernels import apply_fused_kernels
from calm_dist.model.hub import local_path


def load_causal_lm(name_or_path: str, revision: str | None = None, dtype=None, trust_remote_code: bool = False,
                   attn_implementation: str = "sdpa", fused_kernels: str = "none"):
    """A local directory, or a hub id's snapshot in the HF cache (model/hub.py: fetched when missing). Safetensors
    only: a pickled checkpoint (.bin) is refused rather than unpickled. `attn_implementation` is transformers'
    (model.attn_implementation: sdpa, eager, flash_attention_2, ...), whatever the checkpoint's config says;
    `fused_kernels` patches its norms, activation and rotary embedding (model.fused_kernels: model/fused_kernels.py)."""
    directory = local_path(str(name_or_path), revision, "model")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True, attn_implementation=attn_implementation)
    model.config._name_or_path = str(name_or_path)  # a saved composition names the hub id, not this cache's path
    return apply_fused_kernels(model, fused_kernels)


def write_random_augmenting(path: str, seed: int, target: Path, revision: str | None = None) -> None:
    """A randomly initialised model of `path`'s architecture, seeded, saved to `target`. Written aside, then renamed:
    a process killed while saving leaves no directory that looks complete."""
    from calm_dist.model.baselines import random_augmenting  # here: baselines imports composition, which imports io

    model = random_augmenting(AutoConfig.from_pretrained(local_path(path, revision, "model", weights=False)), seed=seed)
    staged = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete directory (no config.json) would block the rename
    staged.rename(target)
