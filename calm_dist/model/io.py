"""Models on disk: loading a decoder LM (safetensors only, never a pickle) and the randomly initialised augmenting
models of the ablation, written once per output directory so that evaluation loads the very weights that trained."""
from __future__ import annotations

from pathlib import Path

from calm_dist.config import Config


def load_causal_lm(name_or_path: str, revision: str | None = None, dtype=None, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    # safetensors only: a pickled checkpoint (.bin) is refused rather than unpickled
    return AutoModelForCausalLM.from_pretrained(
        name_or_path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def materialize_random_augmenting(cfg: Config, is_main: bool) -> list[str]:
    """Randomly initialised copies of the augmenting architectures, seeded, saved once per output_dir.

    Rank 0 writes them while the other ranks wait, however long a large model takes to write, until rank 0
    fails or its heartbeat has been silent for distributed.timeout_s (calm_dist/training/rank_zero.py)."""
    from functools import partial

    from calm_dist.training.rank_zero import run_on_rank_zero

    out = []
    for i, path in enumerate(cfg.model.augmenting):
        target = Path(cfg.train.output_dir) / "random_augmenting" / str(i)
        run_on_rank_zero(f"writing the random augmenting model {target}", is_main,
                         partial(_write_random_augmenting, path, cfg.train.seed + 1 + i, target),
                         done=(target / "config.json").exists, status_file=target.with_name(f"{i}.status"),
                         silence_s=cfg.distributed.timeout_s)
        out.append(str(target))
    return out


def _write_random_augmenting(path: str, seed: int, target: Path) -> None:
    """Written aside, then renamed: a rank 0 killed while saving leaves no directory that looks complete."""
    import shutil

    from transformers import AutoConfig

    from calm_dist.model.baselines import random_augmenting

    model = random_augmenting(AutoConfig.from_pretrained(path), seed=seed)
    staged = target.with_name(f"{target.name}.tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete directory (no config.json) would block the rename
    staged.rename(target)
