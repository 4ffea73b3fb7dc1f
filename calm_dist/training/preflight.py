"""Check a config against the world before anything heavy: files, model shapes, tokenizer, world size, and
whatever needs more than one field (each section checks its own fields as it loads: calm_dist/config.py).

Fetches the hub ids the HF cache lacks (rank 0), reads small files (each model's config.json, each model's
tokenizer, the DeepSpeed JSON) and tokenizes the data into data.cache_dir, where a bad row shows; loads no weights
and starts no process group. Every problem is a ConfigError (one line, exit code 2), and nothing else on disk is
touched.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from calm_dist.config import Config, ConfigError, flatten, load_config
from calm_dist.data.aligned_rows import reading_tokenizers
from calm_dist.data.prepare import load_rows, load_training_rows
from calm_dist.data.sources import open_source
from calm_dist.data.tokenizer import Tokenizer, check_same_vocabulary, check_tokenizer_matches, model_tokenizers
from calm_dist.model.backbones import Backbone, UnsupportedArchitecture
from calm_dist.model.fused_kernels import FusedKernelsError, check_fused_kernels
from calm_dist.model.hub import fetch_on_rank_zero, local_path
from calm_dist.model.layer_pairs import MappingError, default_layer_pairs, validate_layer_pairs
from calm_dist.credentials import redact
from calm_dist.tracking.store import probe_tracking_store
from calm_dist.training.checkpoint import (CheckpointError, DamagedCheckpoint, checkpoints_dir, read_checkpoint_state,
                                           resume_candidates)
from calm_dist.training.compile_policy import hooks_inside_blocks
from calm_dist.training.dist_env import DistEnv
from calm_dist.training.ds_config import (TRAINING_STAGES, build_ds_config, gradient_accumulation_steps, read_ds_json,
                                          zero_stage)


@dataclass
class ResolvedRun:
    """The run as preflight resolved it against the models, data and checkpoints on disk, handed to the trainer
    so nothing is read twice."""

    anchor_config: object
    augmenting_configs: list
    layer_pairs: list[list[tuple[int, int]]]
    accumulation: int
    ds_config: dict
    # checkpoints a resume may start from, best first, each with the problem found here (None: fits so far);
    # the trainer verifies the large files and resumes the first one intact on every rank
    resume_candidates: list[tuple[Path, str | None]]


def read_model_config(path: str, revision: str | None, trust_remote_code: bool, key: str):
    """The model's config.json (from a directory or a hub id's snapshot in the HF cache), refused unless calm_dist
    can compose its architecture and the model holds safetensors weights."""
    from transformers import AutoConfig  # lazy: seconds to import, never needed by a config refused earlier

    directory = local_path(path, revision, key)
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: cannot read a model config from {path}: {str(e).splitlines()[0]}") from None
    try:
        Backbone.from_config(config)
    except UnsupportedArchitecture as e:
        raise ConfigError(f"{key}: {e}") from None
    return config


def check_fused_kernel_families(cfg: Config, anchor_config, augmenting_configs: list) -> None:
    """model.fused_kernels patches every frozen model: each family must be one the kernels know, and the run must
    have the GPU they are built for."""
    kind = cfg.model.fused_kernels
    if kind == "none":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"model.fused_kernels={kind} runs on NVIDIA GPUs (Triton) and this machine has none")
    configs = [("model.anchor", anchor_config)] + [(f"model.augmenting[{i}]", c)
                                                    for i, c in enumerate(augmenting_configs)]
    for key, config in configs:
        try:
            check_fused_kernels(kind, config.model_type, key)
        except FusedKernelsError as e:
            raise ConfigError(str(e)) from None


def preflight(cfg: Config, env: DistEnv, *, need_train_data: bool = True, training: bool = True) -> ResolvedRun:
    """Check `cfg` on this rank and return what it resolved. `need_train_data=False` (eval): data.train is not
    read. `training=False` (cache, eval): skip the output directory's checkpoint and resume checks."""
    model_cfg, data_cfg, train_cfg = cfg.model, cfg.data, cfg.train
    if not model_cfg.augmenting:
        raise ConfigError("model.augmenting lists no augmenting model")
    if model_cfg.augmenting_revisions is not None and len(model_cfg.augmenting_revisions) != len(model_cfg.augmenting):
        raise ConfigError("model.augmenting_revisions must name one revision per augmenting model")
    if model_cfg.method == "lora" and (train_cfg.augmenting_states == "cached" or train_cfg.activation_checkpointing):
        raise ConfigError("model.method=lora trains the anchor alone: it takes neither cached augmenting states "
                          "nor the composition's activation checkpointing")
    if model_cfg.augmenting_init == "random" and train_cfg.augmenting_states == "cached":
        raise ConfigError("model.augmenting_init=random recomputes its states: use train.augmenting_states=recompute")
    for key, step in (("train.stop_after_step", train_cfg.stop_after_step),
                      ("train.fail_at_step", train_cfg.fail_at_step)):
        if step is not None and step >= train_cfg.steps:  # it would never happen: the run ends at train.steps
            raise ConfigError(f"{key}={step} is not before train.steps={train_cfg.steps}")
    if cfg.optim.warmup_steps > train_cfg.steps:
        raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} is more than train.steps={train_cfg.steps}: "
                          "the learning rate would never reach optim.lr")
    ds_path, ds_json = read_ds_json(cfg.distributed.deepspeed_config)
    stage = zero_stage(ds_json)
    if stage not in TRAINING_STAGES:
        raise ConfigError(f"{cfg.distributed.deepspeed_config}: calm_dist trains under ZeRO stage 2 (the frozen models "
                          f"whole on every rank) or 3 (sharded); zero_optimization.stage is {stage}")
    if stage == 2 and ds_json.get("zero_optimization", {}).get("elastic_checkpoint"):
        # an elastic ZeRO-2 checkpoint is restored from every rank's partition; each rank reads only its own
        raise ConfigError(f"{ds_path}: zero_optimization.elastic_checkpoint=true is not supported: each rank resumes "
                          "from its own optimizer partition; set it to false or leave it out")
    if train_cfg.compile is True and hooks_inside_blocks(cfg, stage):  # auto then stays off
        raise ConfigError("train.compile needs distributed.zero3_leaf_blocks=true under ZeRO-3: DeepSpeed's "
                          "per-module hooks cannot run inside a compiled block")
    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.tracking_uri)
    for key, path in (("train.output_dir", train_cfg.output_dir), ("data.cache_dir", data_cache_dir(cfg)),
                      ("train.states_cache_dir", train_cfg.states_cache_dir)):
        check_directory_can_exist(key, path)
    if training and env.is_main:  # rank 0 alone logs, so it alone asks the store (a few seconds at most)
        probe_tracking_store(cfg.tracking, train_cfg.output_dir)

    if data_cfg.augmenting_tokenizers is not None and len(data_cfg.augmenting_tokenizers) != len(model_cfg.augmenting):
        raise ConfigError("data.augmenting_tokenizers must name one tokenizer (or null) per augmenting model")
    fetch_from_hub(cfg, env)
    anchor = read_model_config(model_cfg.anchor, model_cfg.anchor_revision, model_cfg.trust_remote_code,
                               "model.anchor")
    revisions = model_cfg.augmenting_revisions or [None] * len(model_cfg.augmenting)
    augmenting = [read_model_config(path, revision, model_cfg.trust_remote_code, f"model.augmenting[{i}]")
                  for i, (path, revision) in enumerate(zip(model_cfg.augmenting, revisions))]

    check_fused_kernel_families(cfg, anchor, augmenting)
    if model_cfg.layer_pairs is not None and len(model_cfg.layer_pairs) != len(augmenting):
        raise ConfigError(f"model.layer_pairs has {len(model_cfg.layer_pairs)} lists for {len(augmenting)} "
                          "augmenting models")
    try:
        pairs = [validate_layer_pairs(model_cfg.layer_pairs[i], augmenting_config.num_hidden_layers,
                                      anchor.num_hidden_layers, f"augmenting model {i}")
                 if model_cfg.layer_pairs is not None
                 else default_layer_pairs(augmenting_config.num_hidden_layers, anchor.num_hidden_layers,
                                          model_cfg.every)
                 for i, augmenting_config in enumerate(augmenting)]
    except MappingError as e:
        raise ConfigError(f"model.layer_pairs: {e}") from None
    heads = model_cfg.num_heads or anchor.num_attention_heads
    if anchor.hidden_size % heads:
        raise ConfigError(f"model.num_heads={heads} does not divide the anchor width {anchor.hidden_size}")
    check_position_limit("model.anchor", anchor, data_cfg.seq_len)
    for i, config in enumerate(augmenting):  # with different tokenizers an augmenting row has its own length
        check_position_limit(f"model.augmenting[{i}]", config, data_cfg.augmenting_len,
                             "data.augmenting_seq_len" if data_cfg.augmenting_seq_len else "data.seq_len")
    if data_cfg.different_tokenizers and model_cfg.augmenting_sees == "prompt":
        raise ConfigError("model.augmenting_sees=prompt is not supported with data.different_tokenizers: the "
                          "augmenting models read the whole text, aligned by characters")

    sources = (data_cfg.train_sources() if need_train_data else []) + (
        [("data.eval", data_cfg.eval, 1.0)] if data_cfg.eval is not None else [])
    for key, spec, _ in sources:
        if not spec:
            raise ConfigError(f"{key} is not set")
        open_source(spec, key)  # the files exist and are of one kind: cheap, on every rank
    tokenizer = check_tokenizers(cfg, anchor, augmenting)
    # Rank 0 prepares the token shards when they are missing; a bad row (a missing field, an over-long record, an
    # empty set) stops every rank with its one line.
    prepared = dict(is_writer=env.is_main, silence_s=cfg.distributed.timeout_s, workers=data_cfg.workers,
                    augmenting=reading_tokenizers(cfg))
    train_fingerprint = None
    if need_train_data:
        train_fingerprint = load_training_rows(data_cfg, tokenizer, data_cache_dir(cfg), **prepared).fingerprint
    if data_cfg.eval is not None:
        load_rows(data_cfg, data_cfg.eval, "data.eval", tokenizer, data_cache_dir(cfg), **prepared)

    accumulation = gradient_accumulation_steps(cfg, env.world_size)
    ds_config = build_ds_config(cfg, env.world_size, [anchor, *augmenting])
    resume = _check_resume(cfg, env, train_fingerprint) if training else []
    return ResolvedRun(anchor, augmenting, pairs, accumulation, ds_config, resume)


def fetch_from_hub(cfg: Config, env: DistEnv) -> None:
    """Every hub id of the run (models, tokenizers) into the Hugging Face cache, once: rank 0 fetches what the
    cache lacks while the other ranks wait on its heartbeat, outside the collective timeout (model/hub.py).
    Then every rank reads the snapshots as local directories."""
    model_cfg, data_cfg = cfg.model, cfg.data
    revisions = model_cfg.augmenting_revisions or [None] * len(model_cfg.augmenting)
    wanted = [("model.anchor", model_cfg.anchor, model_cfg.anchor_revision, True),
              *((f"model.augmenting[{i}]", name, revision, True)
                for i, (name, revision) in enumerate(zip(model_cfg.augmenting, revisions))),
              ("data.tokenizer", data_cfg.tokenizer, None, False),
              *((f"data.augmenting_tokenizers[{i}]", name, None, False)
                for i, name in enumerate(data_cfg.augmenting_tokenizers or []) if name)]
    for key, name, revision, weights in wanted:
        fetch_on_rank_zero(name, revision, key, weights=weights, is_rank_zero=env.is_main,
                           silence_s=cfg.distributed.timeout_s, status_dir=data_cache_dir(cfg) / "hub")


def check_tokenizers(cfg: Config, anchor_config, augmenting_configs: list) -> Tokenizer:
    """Each model's tokenizer (data/tokenizer.py: model_tokenizers) fits its embedding table and special ids, and
    has the vocabulary of the data's tokenizer, whose ids every model reads. The vocabulary is the tokenizers' to
    decide, not the configs': equal vocab_size does not make one tokenizer (Llama-2 and Mistral-v0.1 both have
    32,000 tokens), nor do padded tables make two (Qwen2.5-0.5B has 151,936 rows, Qwen2.5-7B 152,064). With
    data.different_tokenizers the augmenting vocabularies may differ, but every tokenizer must give character
    offsets, what the models are aligned by. Returns the data's tokenizer."""
    tokenizers = model_tokenizers(cfg)
    check_tokenizer_matches(tokenizers.anchor, anchor_config, "anchor")
    if tokenizers.anchor_saved is not None:
        check_same_vocabulary(tokenizers.anchor, tokenizers.anchor_saved)
    different = cfg.data.different_tokenizers
    if different:
        check_offsets(tokenizers.anchor)
    for i, (tokenizer, config) in enumerate(zip(tokenizers.augmenting, augmenting_configs)):
        check_tokenizer_matches(tokenizer, config, f"augmenting model {i}")
        if different:
            check_offsets(tokenizer)
        elif tokenizer is not tokenizers.anchor:
            try:
                check_same_vocabulary(tokenizers.anchor, tokenizer)
            except ConfigError as e:
                raise ConfigError(f"{e}, or set data.different_tokenizers=true to align them by characters") from None
    return tokenizers.anchor


def check_offsets(tokenizer: Tokenizer) -> None:
    """The tokenizer reports each token's character span (a slow transformers tokenizer does not): refused here,
    before any data is prepared or weight loaded, with Tokenizer.encode_with_spans's one line."""
    tokenizer.encode_with_spans("a b")


def data_cache_dir(cfg: Config) -> Path:
    return Path(cfg.data.cache_dir or Path(cfg.train.output_dir).parent / "data_cache")


def check_position_limit(key: str, model_config, seq_len: int, length_key: str = "data.seq_len") -> None:
    """Every model reads whole rows of `length_key` tokens, so each must have position ids for all of them
    (GPT-2 names the limit n_positions; its config maps max_position_embeddings onto it)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"{length_key}={seq_len} exceeds {key}'s position limit (max_position_embeddings={limit})")


def check_directory_can_exist(key: str, path: str | Path | None) -> None:
    """A directory the run will create or write into: neither it nor any existing parent is a regular file."""
    if path is None:
        return
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(f"{key}={path}: {candidate} is a file, not a directory")
            return


def check_tracking_uri(configured: str | None) -> None:
    """The tracking URI's scheme (tracking.tracking_uri, else $MLFLOW_TRACKING_URI) must name one of MLflow's
    tracking stores: MLflow's own registry of them (its built-in schemes and any installed store plugins)
    decides, as MlflowClient will. Unset, or a bare path (a sqlite file or a file store), always has a store."""
    key, uri = ("tracking.tracking_uri", configured) if configured else (
        "$MLFLOW_TRACKING_URI", os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri or "://" not in uri:
        return
    from mlflow.exceptions import MlflowException  # lazy: mlflow takes seconds to import
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        schemes = ", ".join(sorted(s for s in _tracking_store_registry._registry if s))
        raise ConfigError(f"{key}={redact(uri)}: MLflow has no tracking store for the scheme "
                          f"{uri.split('://', 1)[0]!r} (it knows {schemes})") from None


def _check_resume(cfg: Config, env: DistEnv, train_fingerprint: str | None) -> list[tuple[Path, str | None]]:
    """The resume candidates; the newest readable one must fit this world size and config, or it is refused."""
    train_cfg = cfg.train
    try:
        directories = resume_candidates(train_cfg.resume, train_cfg.output_dir)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    if not directories:
        existing = checkpoints_dir(train_cfg.output_dir)
        if existing.is_dir() and any(p.name.startswith("step_") for p in existing.iterdir()):
            raise ConfigError(f"{existing} already holds checkpoints: pass train.resume=auto to continue, or choose "
                              "another train.output_dir (nothing is overwritten)")
        return []
    candidates, fitting_seen = [], False
    for directory in directories:
        try:
            state = read_checkpoint_state(directory)
        except DamagedCheckpoint as e:
            if train_cfg.resume != "auto":
                raise
            candidates.append((directory, str(e)))
            continue
        problem = _resume_mismatch(cfg, env, directory, state, train_fingerprint)
        if problem and not fitting_seen:  # the checkpoint the user means: say what does not fit
            raise ConfigError(problem)
        fitting_seen = True
        candidates.append((directory, problem))
    if all(problem for _, problem in candidates):
        raise DamagedCheckpoint(f"no intact checkpoint to resume under {checkpoints_dir(train_cfg.output_dir)}: "
                                + "; ".join(problem for _, problem in candidates))
    return candidates


def _resume_mismatch(cfg: Config, env: DistEnv, directory: Path, state: dict, train_fingerprint: str | None):
    """Why `directory` cannot be resumed with this config and world (None: it can)."""
    if state["world_size"] != env.world_size:
        return (f"{directory} was written by {state['world_size']} ranks; resume it with the same world size "
                f"(now {env.world_size})")
    try:
        saved = load_config(directory / "config.yaml")
    except ConfigError as e:
        return f"{directory}/config.yaml does not load with this version of calm_dist: {e}"
    changes = config_changes(saved, cfg, state["data_fingerprint"], train_fingerprint)
    refused = {k: v for k, v in changes.items() if k not in cfg.train.resume_allow_changes}
    if not refused:
        return None
    return (f"the config differs from the one {directory} was written with, in "
            + "; ".join(f"{k} ({v})" for k, v in refused.items())
            + f": restore the saved values, or list the keys that may change in "
            f"train.resume_allow_changes=[{','.join(refused)}]")


# Keys that never change what a resumed run computes: where it writes, how often it logs, evaluates and
# checkpoints, when it stops, how it is tracked, where its caches live, and how ZeRO-3 partitions, gathers,
# compiles or recomputes the same math. data.train and data.tokenizer are compared by the tokenized data's
# fingerprint (data bytes + tokenizer + tokenization settings) instead of by path.
NEVER_COMPARED = {
    "train.output_dir", "train.resume", "train.resume_allow_changes", "train.log_every", "train.eval_every",
    "train.checkpoint_every", "train.keep_last", "train.stop_after_step", "train.fail_at_step",
    "train.peak_tflops_per_rank", "train.states_cache_dir", "train.augmenting_states", "train.compile",
    "train.activation_checkpointing", "data.cache_dir", "distributed.timeout_s", "distributed.deepspeed_config",
    "distributed.zero3_leaf_blocks", "data.train", "data.tokenizer", "data.workers"}
NEVER_COMPARED_SECTIONS = ("tracking.",)
FINGERPRINTED = ("data.format", "data.prompt_field", "data.completion_field", "data.text_field", "data.seq_len",
                 "data.packing", "data.overlong", "data.different_tokenizers", "data.augmenting_seq_len")


def config_changes(saved: Config, cfg: Config, saved_fingerprint: str, fingerprint: str | None) -> dict[str, str]:
    """{key: "old -> new"} for every key that changes the run (train.steps only under a cosine schedule,
    where it sets the decay's length)."""
    old, new = flatten(saved.to_dict()), flatten(cfg.to_dict())

    def compared(key: str) -> bool:
        if key == "train.steps":
            return cfg.optim.schedule == "cosine" or saved.optim.schedule == "cosine"
        return key not in NEVER_COMPARED and not key.startswith(NEVER_COMPARED_SECTIONS)
    changes = {k: f"{old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
               if compared(k) and old.get(k) != new.get(k)}
    if fingerprint is not None and fingerprint != saved_fingerprint and not any(k in changes for k in FINGERPRINTED):
        moved = [k for k in ("data.train", "data.tokenizer") if old[k] != new[k]] or ["data.train"]
        for key in moved:
            changes[key] = f"{old[key]!r} -> {new[key]!r}, tokenized data {saved_fingerprint} -> {fingerprint}"
    return changes

