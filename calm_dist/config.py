"""The one typed config tree: dataclasses, loaded from YAML with dotted `key=value` overrides.

Loading checks names and types first (an unknown key or a non-numeric number is a `ConfigError`); then each
section's `__post_init__` checks its own fields one by one (ranges, choices). `calm_dist.training.preflight`
checks what needs more than one field or the world (paths, model shapes, world size) before anything heavy
runs. Every ConfigError ends the program with one line and exit code 2.

Each field is documented by the string literal right under it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# ConfigError lives with the checks that raise it; everything imports it from here, the config tree's module
from calm_dist.config_checks import ConfigError, above, at_least, build_dataclass, check_choices, within
from calm_dist.credentials import redact
from calm_dist.shipped import find_shipped, missing_hint


@dataclass
class ModelConfig:
    """The frozen models and the composition trained on top of them."""

    anchor: str = ""
    """The anchor causal LM, the model the composition extends: a local directory of safetensors weights or a
    hub id. Required: preflight refuses an empty value."""

    augmenting: list[str] = field(default_factory=list)
    """The augmenting causal LMs whose hidden states the anchor attends to (directories or hub ids), at least one.
    Each must share the anchor's tokenizer vocabulary (their embedding tables may differ in size: padding), unless
    data.different_tokenizers lets each read the text through its own."""

    anchor_revision: str | None = None
    """The hub revision (branch, tag or commit) of a hub-id `anchor`; null: the hub's default branch. A hub id is
    fetched once into the Hugging Face cache (rank 0; HF_HUB_OFFLINE=1 reads the cache alone) and a snapshot
    complete there is used as it is (calm_dist/model/hub.py): pin a commit to be sure which one runs."""

    augmenting_revisions: list[str | None] | None = None
    """One hub revision per augmenting model, in the order of `augmenting` (a null entry: the default branch);
    null: the default branch for every one."""

    layer_pairs: list[list[list[int]]] | None = None
    """Per augmenting model, its [augmenting_layer, anchor_layer] pairs of 0-based decoder blocks: the output of
    augmenting block i feeds a cross-attention block added to the output of anchor block j. Null: the paper's
    rule (calm_dist/model/layer_pairs.py), which reads every `every`-th augmenting block."""

    every: int = 4
    """The stride of the paper's default rule: augmenting blocks every-1, 2*every-1, ... are composed (>= 1).
    Read only when `layer_pairs` is null; 4 is the paper's choice."""

    num_heads: int | None = None
    """Heads of each cross-attention block (>= 1); it must divide the anchor's hidden size. Null: the anchor's
    own number of attention heads."""

    trust_remote_code: bool = False
    """Let transformers run model code shipped with a checkpoint. Off by default: a downloaded checkpoint runs
    no code of its own."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    """The attention kernel of the frozen models, passed to transformers' from_pretrained whatever their
    config.json says: sdpa (PyTorch's fused kernels, every device), eager (the reference), flash_attention_2/3
    (NVIDIA GPUs with the flash-attn package; checked up front), flex_attention."""

    fused_kernels: Literal["none", "liger"] = "none"
    """Fused kernels patched into the frozen models' norms, gated MLP and rotary embedding: none (transformers'
    own modules), or liger (Liger Kernel's Triton kernels: NVIDIA GPUs, `pip install 'calm-dist[fused-loss]'`, the
    families Liger knows, checked up front; calm_dist/model/fused_kernels.py). On one H200 they take a composed
    bf16 step from 31% to 48% MFU (benchmarks/README.md, P8)."""

    augmenting_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """The dtype the frozen augmenting models compute their states in, recomputed or cached alike
    (calm_dist/training/parallelize.py: augmenting_compute_dtype). auto: train.precision. bf16 under fp32
    training makes the augmenting forward cheaper at a small relative error in the states."""

    method: Literal["calm", "lora"] = "calm"
    """What is trained: calm, the cross-attention blocks of the composition; lora, the paper's baseline of LoRA
    on the anchor alone with as many trainable parameters (calm_dist/model/baselines.py)."""

    lora_rank: int | None = None
    """The LoRA rank under method=lora (>= 1). Null: the rank whose parameter count matches the composition's,
    the paper's like-for-like comparison."""

    lora_targets: list[str] | None = None
    """The anchor's module names LoRA adapts under method=lora. Null: PEFT's default modules for the anchor's
    model family."""

    augmenting_init: Literal["pretrained", "random"] = "pretrained"
    """pretrained: the augmenting models' own weights. random: the same architectures freshly initialised, the
    ablation that asks whether the composition uses what the augmenting models know."""

    augmenting_sees: Literal["all", "prompt"] = "all"
    """all: each anchor position attends to the augmenting states of every position up to its own (causal).
    prompt: of the prompt's positions only (the prefix-encoder ablation)."""

    def __post_init__(self):
        check_choices("model", self)
        flash = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
        if self.attn_implementation in flash and importlib.util.find_spec(flash[self.attn_implementation]) is None:
            raise ConfigError(f"model.attn_implementation={self.attn_implementation} needs the "
                              f"{flash[self.attn_implementation]} package (NVIDIA GPUs); sdpa runs everywhere")
        if self.fused_kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("model.fused_kernels=liger needs the liger-kernel package (pip install "
                              "'calm-dist[fused-loss]', NVIDIA GPUs); none runs everywhere")
        at_least("model.every", self.every, 1)
        at_least("model.num_heads", self.num_heads, 1)
        at_least("model.lora_rank", self.lora_rank, 1)


@dataclass
class DataSource:
    """One source of a training mixture (data.train as a list)."""

    source: str = ""
    """The data, in any form data.train takes as a single value (file, directory, glob, hf:org/name)."""

    weight: float = 1.0
    """Its share of every global batch, relative to the other sources' weights (> 0)."""

    def __post_init__(self):
        above("data.train[].weight", self.weight, 0)


@dataclass
class DataConfig:
    """The training and evaluation data, the tokenizer, and how records become fixed-length rows."""

    train: str | list[DataSource] = ""
    """The training set: a .jsonl, .json, .parquet or .arrow file; a directory of such files (one kind) or one
    written by `datasets.save_to_disk`; a glob (`data/*.jsonl`); or a Hugging Face dataset,
    `hf:org/name?split=train&config=NAME&revision=REV` (read through `datasets` and its cache; offline works once
    cached). Required for training. A list of {source, weight} mixes several sources: every global batch holds
    each source's share of rows by weight (calm_dist/data/mixture.py), e.g. the composition's data plus 25% of
    the anchor's own data as replay."""

    eval: str | None = None
    """The evaluation set, in the same forms as `train`; null: no evaluation."""

    format: Literal["prompt_completion", "text"] = "prompt_completion"
    """prompt_completion: records of a prompt and a completion, the loss on the completion and its closing eos
    only. text: records of plain text, the loss on every token."""

    prompt_field: str = "prompt"
    """The record field holding the prompt (format=prompt_completion)."""

    completion_field: str = "completion"
    """The record field holding the completion (format=prompt_completion)."""

    text_field: str = "text"
    """The record field holding the text (format=text)."""

    tokenizer: str = ""
    """The tokenizer the data is tokenized with, whose ids every model reads: a SentencePiece .model file, a
    transformers tokenizer directory or a hub id (org/name, its default branch). Empty: the tokenizer saved with
    the anchor (its directory or hub repository, at model.anchor_revision). Set it for models saved without one:
    it then serves every model that has none. It must fit each model's embedding table and special ids, and have
    the vocabulary of every tokenizer saved with a model (checked in preflight)."""

    augmenting_tokenizers: list[str | None] | None = None
    """One tokenizer per augmenting model, in the order of model.augmenting (the same forms as `tokenizer`); a null
    entry, or null: the one saved with that model, else the data's. Each must have the data tokenizer's vocabulary
    (same tokens at the same ids, same bos and eos): CALM feeds the same ids to every model, unless
    `different_tokenizers` is on."""

    different_tokenizers: bool = False
    """Compose models whose tokenizers differ from the anchor's (docs/cross_tokenizer.md): each augmenting model
    reads the record's text through its own tokenizer, aligned to the anchor's tokens by character spans. Every
    tokenizer must report character offsets (a fast transformers tokenizer or SentencePiece), and rows are not
    packed. Off: every augmenting tokenizer must have the anchor's vocabulary (preflight refuses others)."""

    augmenting_seq_len: int | None = None
    """With different_tokenizers: the most tokens an augmenting model reads for one anchor token (>= 1): the
    reading of the text up to that token's end, bos included, whose positions must fit the augmenting model. A
    record over it follows `overlong` (error refuses it naming the row; truncate drops the anchor's last tokens
    until it fits). Null: seq_len. The tails make an augmenting row longer than this (docs/cross_tokenizer.md)."""

    seq_len: int = 64
    """Tokens per row (>= 1): every row is padded (or packed) to exactly this length, so every model must have
    position ids for it."""

    packing: bool = False
    """Concatenate the tokenized records into full rows of seq_len instead of padding each record to its own
    row: no padding is computed. The documents of a row stay apart (their own positions, and attention within
    the document only, in every model and the cross-attention); a record longer than a row continues in the
    next, the rows overlapping by one token so that each of its tokens is predicted once (seq_len >= 2)."""

    overlong: Literal["error", "truncate"] = "error"
    """A record longer than seq_len (without packing): error refuses the data set naming the row; truncate
    keeps its first seq_len tokens."""

    cache_dir: str | None = None
    """Where the prepared token shards are saved (`calm-dist prepare`, or rank 0 at the start of a job), under a
    fingerprint of the data, the tokenizer and these settings. Null: <train.output_dir>/../data_cache, shared by
    the runs of one parent directory."""

    workers: int = 0
    """Processes that tokenize when the data is prepared (>= 0); 0: one per core of the machine."""

    def __post_init__(self):
        check_choices("data", self)
        at_least("data.seq_len", self.seq_len, 1)  # the models' position limits are checked in preflight
        at_least("data.workers", self.workers, 0)
        at_least("data.augmenting_seq_len", self.augmenting_seq_len, 1)
        if self.packing:
            at_least("data.seq_len (with data.packing)", self.seq_len, 2)
            if self.different_tokenizers:
                raise ConfigError("data.packing with data.different_tokenizers is not supported: rows of different "
                                  "tokenizers are aligned one record each (set data.packing=false)")
        if self.augmenting_seq_len is not None and not self.different_tokenizers:
            raise ConfigError("data.augmenting_seq_len is read only with data.different_tokenizers=true (otherwise "
                              "every model reads the rows of data.seq_len)")
        if isinstance(self.train, list):
            self.train = [s if isinstance(s, DataSource) else DataSource(**s) for s in self.train]
            if not self.train:
                raise ConfigError("data.train: an empty list of sources")

    @property
    def augmenting_len(self) -> int:
        """The augmenting models' row length: augmenting_seq_len, else seq_len."""
        return self.augmenting_seq_len or self.seq_len

    def train_sources(self) -> list[tuple[str, str, float]]:
        """(key for messages, spec, weight) of each training source: one for a single data.train."""
        if isinstance(self.train, list):
            return [(f"data.train[{i}]", s.source, s.weight) for i, s in enumerate(self.train)]
        return [("data.train", self.train, 1.0)]


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule, over the trainable parameters only."""

    lr: float = 1e-3
    """The peak learning rate of AdamW, reached at the end of warmup (> 0)."""

    weight_decay: float = 0.0
    """AdamW's decoupled weight decay (>= 0); 0: none."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW's [beta1, beta2], each in [0, 1)."""

    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator (> 0)."""

    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decays from lr to min_lr_ratio * lr over the remaining train.steps; constant keeps
    lr."""

    warmup_steps: int = 0
    """Steps of linear warmup from lr / warmup_steps to lr (>= 0); 0: none. No more than train.steps, or lr is
    never reached (checked in preflight)."""

    min_lr_ratio: float = 0.1
    """The floor of the cosine decay as a fraction of lr, in [0, 1]."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (>= 0); 0: no clipping."""

    def __post_init__(self):
        check_choices("optim", self)
        above("optim.lr", self.lr, 0)
        at_least("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must be two numbers [beta1, beta2], got {self.betas}")
        for i, beta in enumerate(self.betas):
            within(f"optim.betas[{i}]", beta, 0, 1, high_open=True)
        above("optim.eps", self.eps, 0)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        within("optim.min_lr_ratio", self.min_lr_ratio, 0, 1)
        at_least("optim.grad_clip", self.grad_clip, 0)


@dataclass
class TrainConfig:
    """The training loop: length, batches, precision, outputs, checkpoints and resuming."""

    steps: int = 100
    """Optimizer steps of the whole run (>= 1), counted across resumes."""

    micro_batch_size: int = 8
    """Rows per rank per forward and backward (>= 1)."""

    global_batch_size: int | None = None
    """Rows per optimizer step over all ranks (>= 1): a multiple of micro_batch_size x world size, the quotient
    being the gradient accumulation steps. Null: micro_batch_size x world size, no accumulation."""

    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32: everything in fp32. bf16: the frozen models in bf16 and DeepSpeed's bf16 training. fp32 by default:
    every device runs it, the CPUs of the tiny recipes included."""

    seed: int = 0
    """Seeds the trainable weights' initial values, the data order and every generator a step draws from, in
    [0, 2**32): numpy's global generator takes no other seed."""

    output_dir: str = "runs/default"
    """The run's directory: checkpoints, the exported composition (final/), metrics.jsonl and, unless
    tracking.tracking_uri says otherwise, the MLflow store."""

    log_every: int = 10
    """Log the training metrics every this many steps, and at the last (>= 1)."""

    eval_every: int = 0
    """Evaluate every this many steps (>= 0) when data.eval is set; the run always evaluates at the end. 0: only
    at the end."""

    eval_batches: int = 0
    """Micro-batches per rank an evaluation reads (>= 0); 0: the whole eval set."""

    checkpoint_every: int = 0
    """Checkpoint every this many steps (>= 0); the run always checkpoints at the end and when stopped.
    0: only then."""

    keep_last: int = 2
    """Checkpoints kept in output_dir (>= 1), the newest; the older ones are deleted once a new one is
    complete. 2 leaves a previous checkpoint to resume from should the newest be damaged."""

    resume: str | None = None
    """auto: continue from the newest intact checkpoint in output_dir (a fresh start when there is none); a
    step_N directory: continue from it; null: start from scratch, refused if output_dir holds checkpoints."""

    resume_allow_changes: list[str] = field(default_factory=list)
    """Dotted keys (e.g. optim.lr) whose value a resume may change; any other difference from the checkpoint's
    config is refused. Keys that do not change what is computed (where the run writes, how often it logs,
    evaluates and checkpoints, caches, ZeRO knobs, tracking: calm_dist/training/preflight.py, NEVER_COMPARED)
    are never compared; train.steps only under a cosine schedule, whose decay it sets. data.train and
    data.tokenizer are compared by the tokenized data's fingerprint, so moving the files is no change."""

    augmenting_states: Literal["recompute", "cached"] = "recompute"
    """recompute: the augmenting models run at every step. cached: their states are read from a cache that
    `calm-dist cache` built beforehand (states_cache_dir), and their weights are never loaded."""

    states_cache_dir: str | None = None
    """Where `calm-dist cache` writes the augmenting states and augmenting_states=cached reads them. Null:
    <output_dir>/augmenting_cache."""

    states_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """The dtype the cached augmenting states are stored in on disk; bf16 and fp16 halve the cache."""

    activation_checkpointing: bool = False
    """Recompute the anchor blocks above the first composed one in the backward instead of keeping their
    activations: less memory for more compute (calm_dist/training/parallelize.py)."""

    compile: bool | Literal["auto"] = "auto"
    """torch.compile each frozen decoder block, fusing the elementwise work around its matmuls (~10% off a CPU
    step), at the cost of compiling at start (~20 s per process; calm_dist/training/parallelize.py). true needs
    distributed.zero3_leaf_blocks. auto: on when the run is long enough to earn the compilation back
    (calm_dist/training/compile_policy.py: train.steps x the expected step time) and a compiler is there."""

    loss_kernel: Literal["chunked", "liger"] = "chunked"
    """The loss through the anchor's frozen head without the B x T x V logits: chunked, PyTorch chunks of rows
    (calm_dist/model/lm_loss.py, every device); liger, Liger Kernel's fused linear-cross-entropy (Triton, NVIDIA
    GPUs; `pip install calm-dist[fused-loss]`). The same losses (tests/unit/test_fused_loss.py)."""

    peak_tflops_per_rank: float | None = None
    """The peak TFLOP/s of one rank's device, the denominator of MFU (> 0). Null: a table for known GPUs, else a
    measured matmul peak (calm_dist/planning/hardware.py)."""

    stop_after_step: int | None = None
    """Checkpoint and exit cleanly after this step (>= 1, before train.steps), as if preempted."""

    fail_at_step: int | None = None
    """Fault injection for tests (>= 0, before train.steps): rank 1 (rank 0 alone in a world of 1) raises in
    the step that follows this many steps."""

    def __post_init__(self):
        check_choices("train", self)
        if self.loss_kernel == "liger" and importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.loss_kernel=liger needs the liger-kernel package (pip install "
                              "'calm-dist[fused-loss]', NVIDIA GPUs); chunked runs everywhere")
        if self.compile not in (True, False, "auto"):
            raise ConfigError(f"train.compile: expected true, false or 'auto', got {self.compile!r}")
        at_least("train.steps", self.steps, 1)
        at_least("train.micro_batch_size", self.micro_batch_size, 1)
        at_least("train.global_batch_size", self.global_batch_size, 1)
        within("train.seed", self.seed, 0, 2**32, high_open=True)
        at_least("train.log_every", self.log_every, 1)
        at_least("train.eval_every", self.eval_every, 0)
        at_least("train.eval_batches", self.eval_batches, 0)
        at_least("train.checkpoint_every", self.checkpoint_every, 0)
        at_least("train.keep_last", self.keep_last, 1)
        above("train.peak_tflops_per_rank", self.peak_tflops_per_rank, 0)
        at_least("train.stop_after_step", self.stop_after_step, 1)
        at_least("train.fail_at_step", self.fail_at_step, 0)
        for key in self.resume_allow_changes:
            if key not in dotted_keys():
                raise ConfigError(f"train.resume_allow_changes: unknown key {key} (keys are dotted, e.g. optim.lr)")


@dataclass
class DistributedConfig:
    """DeepSpeed ZeRO (stage 3 or 2) and the process group."""

    deepspeed_config: str = "zero3"
    """The DeepSpeed JSON: a path, or the name of a shipped one (zero3, zero3_offload, zero3_hpz,
    zero3_small_models, zero2; `ds_configs/zero3.json` works from any directory too). ZeRO stage 3 shards the
    frozen models; stage 2 keeps them whole on every rank (no gathers: faster where they fit) and shards only
    the composition's gradients and optimizer state; other stages are refused. Its ZeRO knobs are used; batch
    sizes, accumulation, precision and clipping come from this tree, and the JSON may leave them out, set them
    to "auto" or repeat this tree's values (calm_dist/training/ds_config.py); the optimizer and schedule are
    optim.*."""

    timeout_s: int = 300
    """Seconds a collective may wait for the other ranks, and that the ranks wait on rank 0's silent heartbeat
    while it prepares data or models alone (> 0)."""

    zero3_leaf_blocks: bool = True
    """ZeRO-3 gathers each frozen decoder block whole (one hook per block, FSDP-style units) instead of hooking
    every Linear and norm inside it: fewer, larger gathers. false: DeepSpeed's per-module hooks."""

    def __post_init__(self):
        above("distributed.timeout_s", self.timeout_s, 0)


@dataclass
class TrackingConfig:
    """MLflow tracking: where the run's params and metrics go, and how a slow or absent server is handled."""

    enabled: bool = True
    """Log params, metrics and system metrics to MLflow (rank 0 alone); metrics.jsonl is written either way."""

    tracking_uri: str | None = None
    """The MLflow tracking URI (a server, a sqlite file, a file store). Null: $MLFLOW_TRACKING_URI, else
    sqlite:///<train.output_dir>/mlflow.db. Credentials in it are redacted wherever the config is written."""

    experiment: str | None = None
    """The MLflow experiment. Null: $MLFLOW_EXPERIMENT_NAME, else "calm_dist"."""

    run_name: str | None = None
    """The MLflow run's name; null: MLflow picks one."""

    tags: dict[str, str] = field(default_factory=dict)
    """Run tags, over the default tags (host, git commit, Slurm job, ...) and $MLFLOW_TAGS."""

    system_metrics: bool = True
    """Log MLflow's CPU, memory and disk monitor as system/* metrics."""

    retry_interval_s: float = 30.0
    """Seconds between background probes of an unreachable server (> 0); the run goes on and sends its backlog
    once the server answers."""

    flush_budget_s: float = 2.0
    """Seconds at most that one logging call spends sending a backlog (>= 0), so a slow server never stalls a
    step for long."""

    def __post_init__(self):
        above("tracking.retry_interval_s", self.retry_interval_s, 0)
        at_least("tracking.flush_budget_s", self.flush_budget_s, 0)


@dataclass
class Config:
    """The whole tree, one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The frozen models and the composition."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data sets and the tokenizer."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop, its outputs and checkpoints."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """DeepSpeed ZeRO (stage 3 or 2) and the process group."""

    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""

    def to_dict(self) -> dict:
        """The tree as it leaves the process (params, config.json, a checkpoint's config.yaml): credentials in
        the tracking URI redacted."""
        tree = dataclasses.asdict(self)
        tree["tracking"]["tracking_uri"] = redact(tree["tracking"]["tracking_uri"])
        return tree

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def dotted_keys() -> set[str]:
    """Every field of the tree as a dotted key (model.anchor, ..., tracking.tags)."""
    return {f"{section}.{f.name}" for section, cls in typing.get_type_hints(Config).items()
            for f in dataclasses.fields(cls)}


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
    """Read a YAML recipe (a path, or the name of a shipped one: `tiny`) or start from defaults, and apply
    `a.b=value` overrides."""
    data: dict = {}
    if path is not None:
        path = find_shipped(path, "recipes")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist{missing_hint('recipes')}")
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
    return build_dataclass(Config, data)


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
