"""Check a config against the world before anything heavy: files, model shapes, tokenizer, world size.

Reads only small files (config.json of each model, the tokenizer, the DeepSpeed JSON); loads no
weights and starts no process group. Every problem is a ConfigError (one line, exit code 2), and
nothing on disk is touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, checkpoints_dir, read_trainer_state, resolve_resume
from .config import Config, ConfigError
from .distributed import DistEnv, build_ds_config, gradient_accumulation_steps, zero_stage
from .mapping import MappingError, default_layer_pairs, validate_layer_pairs


@dataclass
class Plan:
    """What validation learned, handed to the trainer so nothing is read twice."""

    anchor_config: object
    augmenting_configs: list
    layer_pairs: list[list[tuple[int, int]]]
    accumulation: int
    ds_config: dict
    resume_from: Path | None


def read_model_config(path: str, revision: str | None, trust_remote_code: bool, key: str):
    from transformers import AutoConfig

    if not path:
        raise ConfigError(f"{key} is not set")
    local = Path(path).expanduser()
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError(f"{key}: {path} does not exist")
    try:
        config = AutoConfig.from_pretrained(str(local) if local.exists() else path, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read a model config from {path}: {str(e).splitlines()[0]}") from None
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ConfigError(f"{key}: {path} holds no safetensors weights (pickled checkpoints are refused; "
                          "convert with save_pretrained(..., safe_serialization=True))")
    from .backbones import Backbone, UnsupportedArchitecture

    try:
        Backbone.from_config(config)
    except UnsupportedArchitecture as e:
        raise ConfigError(f"{key}: {e}") from None
    return config


def validate(cfg: Config, env: DistEnv, *, need_train_data: bool = True, training: bool = True) -> Plan:
    """`training=False` (cache, eval): skip the output directory's checkpoint and resume checks."""
    from .composition import CompositionError, check_same_vocabulary
    from .data import Tokenizer, check_tokenizer_matches, load_tokenized

    m, d, t = cfg.model, cfg.data, cfg.train
    if not m.augmenting:
        raise ConfigError("model.augmenting lists no augmenting model")
    if m.augmenting_revisions is not None and len(m.augmenting_revisions) != len(m.augmenting):
        raise ConfigError("model.augmenting_revisions must name one revision per augmenting model")
    for key, value in (("train.steps", t.steps), ("train.micro_batch_size", t.micro_batch_size),
                       ("data.seq_len", d.seq_len), ("train.keep_last", t.keep_last)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if m.method == "lora" and (t.augmenting_states == "cached" or t.activation_checkpointing):
        raise ConfigError("model.method=lora trains the anchor alone: it takes neither cached augmenting states "
                          "nor the composition's activation checkpointing")
    if m.augmenting_init == "random" and t.augmenting_states == "cached":
        raise ConfigError("model.augmenting_init=random recomputes its states: use train.augmenting_states=recompute")
    if t.compile and not cfg.distributed.zero3_leaf_blocks:
        raise ConfigError("train.compile needs distributed.zero3_leaf_blocks=true: DeepSpeed's per-module ZeRO-3 "
                          "hooks cannot run inside a compiled block")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")

    anchor = read_model_config(m.anchor, m.anchor_revision, m.trust_remote_code, "model.anchor")
    revisions = m.augmenting_revisions or [None] * len(m.augmenting)
    augmenting = [read_model_config(p, r, m.trust_remote_code, f"model.augmenting[{i}]")
                  for i, (p, r) in enumerate(zip(m.augmenting, revisions))]
    try:
        for i, a in enumerate(augmenting):
            check_same_vocabulary(anchor, a, i)
    except CompositionError as e:
        raise ConfigError(str(e)) from None

    if m.layer_pairs is not None and len(m.layer_pairs) != len(augmenting):
        raise ConfigError(f"model.layer_pairs has {len(m.layer_pairs)} lists for {len(augmenting)} augmenting models")
    try:
        pairs = [validate_layer_pairs(m.layer_pairs[i], a.num_hidden_layers, anchor.num_hidden_layers,
                                      f"augmenting model {i}") if m.layer_pairs is not None
                 else default_layer_pairs(a.num_hidden_layers, anchor.num_hidden_layers, m.every)
                 for i, a in enumerate(augmenting)]
    except MappingError as e:
        raise ConfigError(f"model.layer_pairs: {e}") from None
    heads = m.num_heads or anchor.num_attention_heads
    if anchor.hidden_size % heads:
        raise ConfigError(f"model.num_heads={heads} does not divide the anchor width {anchor.hidden_size}")

    for key, path in (("data.train", d.train if need_train_data else None), ("data.eval", d.eval)):
        if path is not None and not Path(path).exists():
            raise ConfigError(f"{key}: {path} does not exist" if path else f"{key} is not set")
    if not d.tokenizer or not Path(d.tokenizer).exists():
        raise ConfigError(f"data.tokenizer: {d.tokenizer or '(not set)'} does not exist")
    tokenizer = Tokenizer(d.tokenizer)
    check_tokenizer_matches(tokenizer, anchor, "anchor")
    # Bad rows (missing fields, over-long sequences, an empty set) are found here, on every rank.
    for path in ([d.train] if need_train_data else []) + ([d.eval] if d.eval else []):
        load_tokenized(d, path, tokenizer, data_cache_dir(cfg), is_writer=env.is_main, wait_s=cfg.distributed.timeout_s)

    accumulation = gradient_accumulation_steps(cfg, env.world_size)
    ds_config = build_ds_config(cfg, env.world_size)
    if zero_stage(ds_config) != 3:
        raise ConfigError(f"{cfg.distributed.deepspeed_config}: calm_dist trains under ZeRO stage 3 "
                          f"(zero_optimization.stage is {zero_stage(ds_config)})")
    resume_from = _check_resume(cfg, env) if training else None
    return Plan(anchor, augmenting, pairs, accumulation, ds_config, resume_from)


def data_cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.train.output_dir).parent / "data_cache")


def _check_resume(cfg: Config, env: DistEnv) -> Path | None:
    t = cfg.train
    try:
        resume_from = resolve_resume(t.resume, t.output_dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if resume_from is None:
        existing = checkpoints_dir(t.output_dir)
        if existing.is_dir() and any(p.name.startswith("step_") for p in existing.iterdir()):
            raise ConfigError(f"{existing} already holds checkpoints: pass train.resume=auto to continue, or choose "
                              "another train.output_dir (nothing is overwritten)")
        return None
    saved_world = read_trainer_state(resume_from)["world_size"]
    if saved_world != env.world_size:
        raise ConfigError(f"{resume_from} was written by {saved_world} ranks; resume it with the same world size "
                          f"(now {env.world_size})")
    return resume_from
