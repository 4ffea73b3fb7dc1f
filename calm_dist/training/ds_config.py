"""The JSON DeepSpeed gets: the user's DeepSpeed JSON (distributed.deepspeed_config) completed from the config tree.

The config tree is the one source of truth for batch sizes, accumulation, precision, clipping, the optimizer
and its schedule. A JSON written for HF Trainer works as it is: "auto" in the keys the tree decides takes the
tree's value, and "auto" ZeRO bucket sizes are derived from the models' hidden sizes as transformers does
(HfTrainerDeepSpeedConfig.trainer_config_finalize). An explicit value that disagrees with the tree is refused,
naming both; an optimizer or scheduler block is refused, naming the optim.* keys that set them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from calm_dist.config import Config, ConfigError
from calm_dist.shipped import find_shipped, missing_hint

# Keys the JSON may set freely: ZeRO's partitioning, offload and communication knobs, and diagnostics.
FREE_DS_KEYS = {"zero_optimization", "communication_data_type", "prescale_gradients", "zero_allow_untested_optimizer",
                "activation_checkpointing", "comms_logger", "aio", "flops_profiler", "steps_per_print",
                "wall_clock_breakdown"}

# Blocks the config tree owns outright (DeepSpeed would build a second optimizer or schedule from them).
REFUSED_BLOCKS = {"optimizer": "AdamW is set by optim.lr, optim.betas, optim.eps and optim.weight_decay",
                  "scheduler": "the schedule is set by optim.schedule, optim.warmup_steps and optim.min_lr_ratio"}

# Diagnostics left unset or "auto" stay quiet: the trainer logs each step itself, DeepSpeed's own progress lines
# and timers would repeat it. A value the JSON sets is kept.
QUIET_DEFAULTS = {"steps_per_print": 10**9, "wall_clock_breakdown": False}

# The ZeRO stages calm_dist trains under. 3: every frozen weight sharded, gathered block by block in each step.
# 2: the frozen models whole on every rank (no gathers; for models that fit), the composition's gradients and
# optimizer state sharded. Stages 0 and 1 would save nothing over 2 for a composition's few trainable weights.
TRAINING_STAGES = (2, 3)


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


def tree_values(cfg: Config, world_size: int) -> dict[str, tuple[Any, str]]:
    """Each DeepSpeed key the config tree decides (dotted inside a block) -> (its value, where the tree sets it)."""
    micro, accumulation = cfg.train.micro_batch_size, gradient_accumulation_steps(cfg, world_size)
    batches = (f"train.global_batch_size={cfg.train.global_batch_size} / (train.micro_batch_size={micro} x "
               f"{world_size} ranks)" if cfg.train.global_batch_size is not None else "train.global_batch_size unset")
    return {
        "train_micro_batch_size_per_gpu": (micro, "train.micro_batch_size"),
        "gradient_accumulation_steps": (accumulation, batches),
        "train_batch_size": (micro * accumulation * world_size,
                             f"train.micro_batch_size={micro} x {accumulation} micro-steps x {world_size} ranks"),
        "gradient_clipping": (cfg.optim.grad_clip, "optim.grad_clip"),
        "bf16.enabled": (cfg.train.precision == "bf16", f"train.precision={cfg.train.precision}"),
        "fp16.enabled": (False, f"train.precision={cfg.train.precision}"),  # train.precision offers no fp16
    }


def model_hidden_size(model_config) -> int | None:
    """A model's width by transformers' rule (trainer_config_finalize): hidden_size, else the largest of
    hidden_sizes, else the same in its text_config."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if config is None:
            continue
        if hasattr(config, "hidden_size"):
            return int(config.hidden_size)
        if hasattr(config, "hidden_sizes"):
            return int(max(config.hidden_sizes))
    return None


def zero_auto_values(hidden_size: int) -> dict[str, int]:
    """What "auto" means for the ZeRO bucket sizes, transformers' formulas: a bucket of one hidden x hidden
    matrix, prefetch 0.9 of it, parameters under 10 x hidden kept whole on every rank."""
    return {"reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size}


def read_ds_json(value: str | Path) -> tuple[Path, dict]:
    """The user's DeepSpeed JSON (a path or a shipped name) and where it was found; refused when unreadable or
    when it holds an optimizer or scheduler block."""
    path = find_shipped(value, "ds_configs")
    if not path.is_file():
        raise ConfigError(f"distributed.deepspeed_config: {path} does not exist{missing_hint('ds_configs')}")
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not UTF-8 text: byte {e.object[e.start]:#x} at "
                          f"offset {e.start}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"distributed.deepspeed_config: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"distributed.deepspeed_config: {path} must hold a JSON object")
    for block, where in REFUSED_BLOCKS.items():
        if block in ds:
            raise ConfigError(f"{path} has a {block!r} block: calm_dist does not take it from the DeepSpeed JSON; "
                              f"{where} in the calm_dist config. Remove the block")
    return path, ds


def build_ds_config(cfg: Config, world_size: int, model_configs: list) -> dict:
    """The user's JSON with the tree's values filled in (so the two never disagree) and "auto" ZeRO sizes derived
    from the largest hidden size among `model_configs` (the anchor's and the augmenting models' configs)."""
    path, ds = read_ds_json(cfg.distributed.deepspeed_config)
    filled = tree_values(cfg, world_size)
    allowed = FREE_DS_KEYS | {key.split(".")[0] for key in filled}
    unknown = sorted(set(ds) - allowed)
    if unknown:
        raise ConfigError(f"{path}: unexpected DeepSpeed keys {', '.join(unknown)} "
                          f"(allowed: {', '.join(sorted(allowed))})")
    fill_tree_values(path, ds, filled)
    for key, quiet in QUIET_DEFAULTS.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = quiet
    fill_zero_autos(path, ds, model_configs)
    left = sorted(auto_keys(ds))
    if left:  # DeepSpeed would fail on it later, with a traceback
        raise ConfigError(f"{path}: {', '.join(left)} {'is' if len(left) == 1 else 'are'} \"auto\", which calm_dist "
                          f"does not fill (it fills {', '.join(filled)} and zero_optimization."
                          f"{{{','.join(zero_auto_values(1))}}}): give a value")
    return ds


def fill_tree_values(path: Path, ds: dict, filled: dict[str, tuple[Any, str]]) -> None:
    """Write the tree's value of each key in `filled` into `ds`, where the JSON leaves it out, sets it to "auto"
    or repeats it; a different explicit value is refused, naming both."""
    for key, (value, source) in filled.items():
        *blocks, leaf = key.split(".")
        node = ds
        for block in blocks:
            node = node.setdefault(block, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {block} must be a block such as {{\"enabled\": \"auto\"}}, got "
                                  f"{json.dumps(node)}")
        given = node.get(leaf, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{path} sets {key}={json.dumps(given)}, but the calm_dist config gives "
                              f"{json.dumps(value)} ({source}): set it to \"auto\" or leave it out")
        node[leaf] = value


def fill_zero_autos(path: Path, ds: dict, model_configs: list) -> None:
    """Replace "auto" ZeRO bucket sizes with transformers' values for the widest model. Like transformers, only
    "auto" is replaced: an explicit size is the user's tuning, not a fact the tree knows. All three are filled
    whatever the stage: stage 2 reads reduce_bucket_size and ignores the stage-3 sizes."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{path}: zero_optimization must be a block, got {json.dumps(zero)}")
    wanted = [key for key in zero_auto_values(1) if zero.get(key) == "auto"]
    if not wanted:
        return
    sizes = [size for size in map(model_hidden_size, model_configs) if size is not None]
    if not sizes:
        raise ConfigError(f"{path}: no model config has a hidden_size or hidden_sizes entry, so the \"auto\" values "
                          f"of {', '.join(f'zero_optimization.{k}' for k in wanted)} cannot be derived: give numbers")
    derived = zero_auto_values(max(sizes))  # several models: the widest, as transformers picks the largest width
    for key in wanted:
        zero[key] = derived[key]


def auto_keys(node: dict, prefix: str = ""):
    """The dotted keys still set to "auto" anywhere in the JSON."""
    for key, value in node.items():
        if value == "auto":
            yield prefix + key
        elif isinstance(value, dict):
            yield from auto_keys(value, f"{prefix}{key}.")


def zero_stage(ds_config: dict) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when it names none)."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
