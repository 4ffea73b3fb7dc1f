"""The one typed config tree: dataclasses, loaded from YAML with dotted `key=value` overrides.

Loading checks names and types (an unknown key or a non-numeric number is a `ConfigError`);
`calm_dist.training.preflight` checks the config against the world (paths, model shapes, world size)
before anything heavy runs. Every ConfigError ends the program with one line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work; reported as one line, exit code 2, before any heavy work."""


# Single-field range checks, called from each section's __post_init__; None (unset) always passes. The
# comparisons are written so that NaN fails them too.
def at_least(key: str, value, low) -> None:
    if value is not None and not value >= low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


def above(key: str, value, low) -> None:
    if value is not None and not value > low:
        raise ConfigError(f"{key} must be > {low}, got {value}")


def within(key: str, value, low, high, *, high_open: bool = False) -> None:
    if value is None:
        return
    if not (low <= value < high if high_open else low <= value <= high):
        raise ConfigError(f"{key} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


@dataclass
class ModelConfig:
    anchor: str = ""                       # path (or hub id) of the anchor causal LM
    augmenting: list[str] = field(default_factory=list)
    anchor_revision: str | None = None
    augmenting_revisions: list[str | None] | None = None
    # per augmenting model, (augmenting_layer, anchor_layer) pairs; null: the paper's rule (calm_dist/model/layer_pairs.py)
    layer_pairs: list[list[list[int]]] | None = None
    every: int = 4
    num_heads: int | None = None           # cross-attention heads; null: the anchor's
    trust_remote_code: bool = False
    # the frozen augmenting models' dtype when their states are recomputed (auto: train.precision); bf16
    # under fp32 training takes the augmenting forward off the critical path (~0.9% relative error in states)
    augmenting_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    # baselines and ablations (calm_dist/model/baselines.py), trained through the same entry point
    method: Literal["calm", "lora"] = "calm"          # lora: LoRA on the anchor alone, as many parameters
    lora_rank: int | None = None                      # null: matched to the composition's parameter count
    lora_targets: list[str] | None = None             # null: PEFT's default modules for the anchor's family
    augmenting_init: Literal["pretrained", "random"] = "pretrained"
    augmenting_sees: Literal["all", "prompt"] = "all"  # prompt: the prefix-encoder ablation

    def __post_init__(self):
        at_least("model.every", self.every, 1)
        at_least("model.num_heads", self.num_heads, 1)
        at_least("model.lora_rank", self.lora_rank, 1)


@dataclass
class DataConfig:
    train: str = ""                        # JSONL, Parquet, or a `datasets.save_to_disk` directory
    eval: str | None = None
    format: Literal["prompt_completion", "text"] = "prompt_completion"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = "text"
    tokenizer: str = ""                    # a SentencePiece .model file or a transformers tokenizer directory
    seq_len: int = 64
    packing: bool = False                  # concatenate examples into full rows instead of padding each
    overlong: Literal["error", "truncate"] = "error"
    cache_dir: str | None = None           # tokenized data; null: <output_dir>/../data_cache

    def __post_init__(self):
        at_least("data.seq_len", self.seq_len, 1)  # the models' position limits are checked in validate.py


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0                 # 0: off

    def __post_init__(self):
        above("optim.lr", self.lr, 0)
        at_least("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers [beta1, beta2], got {self.betas}")
        for i, beta in enumerate(self.betas):
            within(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
        above("optim.eps", self.eps, 0)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        within("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)  # the floor of the decay, as a fraction of lr
        at_least("optim.grad_clip", self.grad_clip, 0)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 8              # per rank
    global_batch_size: int | None = None   # null: micro_batch_size * world (no accumulation)
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 0                    # 0: only at the end (when data.eval is set)
    eval_batches: int = 0                  # 0: the whole eval set
    checkpoint_every: int = 0              # 0: only at the end
    keep_last: int = 2
    resume: str | None = None              # "auto" (latest in output_dir), a step_N directory, or null
    # dotted keys a resume may change (e.g. [optim.lr]); any other difference from the checkpoint's config is
    # refused. Never compared, as they do not change what is computed: train.output_dir, resume,
    # resume_allow_changes, log_every, eval_every, checkpoint_every, keep_last, stop_after_step, fail_at_step,
    # peak_tflops_per_rank, augmenting_states, states_cache_dir, compile, activation_checkpointing,
    # data.cache_dir, distributed.* (ZeRO knobs, timeout, leaf blocks) and tracking.*; train.steps only under a
    # constant schedule (a cosine decays over it). data.train and data.tokenizer are compared by the tokenized
    # data's fingerprint (bytes + tokenizer + settings), so moving the files is no change
    resume_allow_changes: list[str] = field(default_factory=list)
    augmenting_states: Literal["recompute", "cached"] = "recompute"
    states_cache_dir: str | None = None    # null: <output_dir>/augmenting_cache
    states_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    activation_checkpointing: bool = False
    # torch.compile each frozen decoder block (calm_dist/training/parallelize.py): fuses HF's elementwise work,
    # 10-13% off the CPU step here for ~20 s of compilation at start; needs distributed.zero3_leaf_blocks
    compile: bool = False
    peak_tflops_per_rank: float | None = None  # for MFU; null: measured matmul peak on CPU, a table for known GPUs
    stop_after_step: int | None = None     # checkpoint and exit cleanly after this step, as if preempted
    fail_at_step: int | None = None        # fault injection for tests: rank 1 raises at this step

    def __post_init__(self):
        at_least("train.steps", self.steps, 1)
        at_least("train.micro_batch_size", self.micro_batch_size, 1)
        at_least("train.global_batch_size", self.global_batch_size, 1)
        # numpy's global generator takes seeds in [0, 2**32); trainer.seed_all seeds it with this
        within("train.seed", self.seed, 0, 2**32, high_open=True)
        at_least("train.log_every", self.log_every, 1)
        at_least("train.eval_every", self.eval_every, 0)
        at_least("train.eval_batches", self.eval_batches, 0)
        at_least("train.checkpoint_every", self.checkpoint_every, 0)
        at_least("train.keep_last", self.keep_last, 1)
        above("train.peak_tflops_per_rank", self.peak_tflops_per_rank, 0)
        at_least("train.stop_after_step", self.stop_after_step, 1)
        at_least("train.fail_at_step", self.fail_at_step, 0)


@dataclass
class DistributedConfig:
    deepspeed_config: str = "ds_configs/zero3.json"   # ZeRO knobs only; the rest is filled in from this tree
    timeout_s: int = 300
    # ZeRO-3 gathers each frozen decoder block whole (one hook per block, FSDP-style units) instead of
    # hooking every Linear and norm inside it; false restores DeepSpeed's per-module hooks.
    zero3_leaf_blocks: bool = True

    def __post_init__(self):
        above("distributed.timeout_s", self.timeout_s, 0)


@dataclass
class TrackingConfig:
    enabled: bool = True
    tracking_uri: str | None = None        # null: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    experiment: str | None = None          # null: $MLFLOW_EXPERIMENT_NAME, else "calm_dist"
    run_name: str | None = None
    tags: dict[str, str] = field(default_factory=dict)  # over default_tags() and $MLFLOW_TAGS
    system_metrics: bool = True            # MLflow's CPU/memory/disk monitor as system/* metrics
    retry_interval_s: float = 30.0         # server unreachable: probe it this often, in the background
    flush_budget_s: float = 2.0            # at most this long per logging call spent sending a backlog

    def __post_init__(self):
        above("tracking.retry_interval_s", self.retry_interval_s, 0)
        at_least("tracking.flush_budget_s", self.flush_budget_s, 0)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        """The tree as it leaves the process (params, config.json, a checkpoint's config.yaml): credentials in
        the tracking URI redacted."""
        from calm_dist.tracking.credentials import redact

        d = dataclasses.asdict(self)
        d["tracking"]["tracking_uri"] = redact(d["tracking"]["tracking_uri"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` as `annotation`, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_check(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _check(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # no field means anything by inf or nan
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _build(cls, data: Any, where: str = ""):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(prefix + n for n in names))})")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML recipe (or start from defaults) and apply `a.b=value` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: byte {e.object[e.start]:#04x} at offset "
                              f"{e.start}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(Config, data)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: MLflow params, config diffs."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
