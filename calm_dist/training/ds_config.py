"""The DeepSpeed JSON: which keys a user's file may set, and the config DeepSpeed gets from ours.

The batch sizes, optimizer, schedule, clipping and precision come from the config tree (one source of truth);
ZeRO knobs and a few diagnostics may come from the user's DeepSpeed JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

from calm_dist import SOURCE_TREE
from calm_dist.config import Config, ConfigError

# The keys a user's DeepSpeed JSON may set: ZeRO's partitioning, offload and communication knobs, and diagnostics.
ALLOWED_DS_KEYS = {"zero_optimization", "communication_data_type", "prescale_gradients",
                   "zero_allow_untested_optimizer", "activation_checkpointing", "comms_logger", "aio", "flops_profiler"}

# The keys the config tree owns (build_ds_config writes them): set in the JSON too, they could disagree with it.
OWNED_DS_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
                 "scheduler", "gradient_clipping", "bf16", "fp16"}


def gradient_accumulation_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step: train.global_batch_size / (micro_batch_size x world size), 1 when the
    global batch is unset; a global batch that does not divide evenly is refused."""
    micro, global_batch = cfg.train.micro_batch_size, cfg.train.global_batch_size
    if global_batch is None:
        return 1
    if global_batch % (micro * world_size):
        raise ConfigError(f"train.global_batch_size={global_batch} is not a multiple of micro_batch_size x world size "
                          f"= {micro} x {world_size}")
    return global_batch // (micro * world_size)


def read_ds_json(path: str | Path) -> dict:
    """The user's DeepSpeed JSON (distributed.deepspeed_config), refused when unreadable or when it sets a key
    outside ALLOWED_DS_KEYS."""
    path = resolve_repo_path(path)
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not UTF-8 text: byte {e.object[e.start]:#x} at "
                          f"offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not valid JSON: {e}") from None
    owned = sorted(set(ds) & OWNED_DS_KEYS)
    if owned:
        raise ConfigError(f"{path} sets {', '.join(owned)}: batch sizes, precision, clipping, optimizer and scheduler "
                          "come from the calm_dist config; keep only ZeRO knobs in the DeepSpeed JSON")
    unknown = sorted(set(ds) - ALLOWED_DS_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unexpected DeepSpeed keys {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(ALLOWED_DS_KEYS))})")
    return ds


def resolve_repo_path(path: str | Path) -> Path:
    """Relative paths resolve against the working directory, then the repository (for ds_configs/)."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    repo = SOURCE_TREE / path
    return repo if repo.exists() else path


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON's ZeRO knobs + what our config owns, so the two can never disagree."""
    ds = read_ds_json(cfg.distributed.deepspeed_config)
    accumulation = gradient_accumulation_steps(cfg, world_size)
    ds.update({
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.micro_batch_size * accumulation * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "steps_per_print": 10**9,  # DeepSpeed's own progress lines and timers off: the trainer logs each step
        "wall_clock_breakdown": False,
    })
    return ds


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
