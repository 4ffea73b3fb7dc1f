"""The augmenting models' states at the composed layers, computed once and streamed from disk.

The augmenting models are frozen and read the same tokens as the anchor, so their states are a pure
function of (weights, layers, tokenized data, compute dtype). Layout of `<cache_dir>/<split>/`:

    shard-00000.safetensors    rows [0, R): one tensor "a{model}.l{layer}" [R, seq_len, D_aug] per used layer
    shard-00000.json           its sha256, first row, row count and writer rank (written after the shard:
                               complete iff present)
    building.json              the fingerprint components and the shard size R, written first: a resumed run
                               must match them, so every shard of one cache has the same R
    manifest.json              written last by rank 0 once every sidecar covers its rows: components (with R),
                               fingerprint, shapes, every shard's checksum

With data.different_tokenizers an augmenting model reads its own tokens of each row's text (F, then the tails of
the prefixes that read otherwise: calm_dist/data/aligned_rows.py), as many as the row needs: a shard holds, per
used layer, "a{model}.l{layer}" [T, D_aug], the real tokens of its rows back to back, and "a{model}.offsets"
[R + 1] int64, where each row's tokens start (components "reading": "characters"). A read pads the rows' states
on the right to the longest, the layout of the micro-batch's AugmentingInputs (right-padded, the same rows).

Shards are computed in fixed micro-batches, so any run (any world size, resumed or not) writes the
same bytes. Rank r writes shards r, r + world, ...; an interrupted run skips the shards already done.
Readers memory-map the shards (safetensors slices) and verify checksums before any row is used.
"""
from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from calm_dist.config import ConfigError
from calm_dist.data.aligned_rows import reading_tokenizers, with_alignment
from calm_dist.data.prepare import load_rows, load_training_rows
from calm_dist.data.sources import open_source
from calm_dist.data.tokenizer import Tokenizer, anchor_tokenizer
from calm_dist.files import replacing, save_safetensors, sha256_file, write_atomic
from calm_dist.model import backbones
from calm_dist.model.composition import backbone_inputs, capture_block_outputs, truncate_after
from calm_dist.model.hub import local_path
from calm_dist.model.io import load_causal_lm
from calm_dist.model.layer_pairs import used_augmenting_layers
from calm_dist.planning import costs
from calm_dist.training.agreement import run_everywhere
from calm_dist.training.dist_env import DistEnv, init_process_group, local_device, shut_down_process_group
from calm_dist.training.locks import lock_for_job
from calm_dist.training.parallelize import augmenting_compute_dtype
from calm_dist.training.preflight import data_cache_dir

FORMAT = 2  # 2: compute dtype and shard size recorded, sidecars name their first row
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MANIFEST, BUILDING = "manifest.json", "building.json"
# How the rows are cut into shards: the builder's choice (`--rows-per-shard`), recorded with the components;
# readers follow the recorded value instead of expecting one.
LAYOUT_KEYS = ("rows_per_shard",)


class CacheError(RuntimeError):
    """A cache that must not be trained on: stale, incomplete, truncated or corrupted."""


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the config and every weight file of a saved model directory (a hub snapshot's files are links
    into the HF cache's blobs: their bytes are hashed)."""
    model_dir = Path(model_dir)
    files = sorted(p for p in model_dir.iterdir()
                   if p.name == "config.json" or p.suffix in (".safetensors", ".bin", ".pt"))
    if not files:
        raise CacheError(f"{model_dir} holds no model files to fingerprint")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


def components(model_dirs: list[str], revisions: list, layers: list[list[int]], data_fingerprint: str,
               seq_len: int, dtype: str, compute_dtype: str, by_characters: bool = False) -> dict:
    """What the cached states depend on; a cache whose components differ is refused, naming them.
    `by_characters`: each augmenting model read the rows' text through its own tokenizer (the data fingerprint then
    covers those tokenizers and data.augmenting_seq_len); the states are stored per row, ragged."""
    comps = {
        "format": FORMAT,
        "augmenting_weights": [weights_fingerprint(d) for d in model_dirs],
        "augmenting_revisions": list(revisions),
        "layers": [list(map(int, ls)) for ls in layers],
        "data_and_tokenization": data_fingerprint,  # data bytes + tokenizer + tokenization settings
        "seq_len": seq_len,
        "dtype": dtype,  # the states' storage dtype on disk (train.states_dtype)
        "compute_dtype": compute_dtype,  # the augmenting models' dtype in the forward that made them
    }
    return {**comps, "reading": "characters"} if by_characters else comps


def fingerprint(comps: dict) -> str:
    return hashlib.sha256(json.dumps(comps, sort_keys=True).encode()).hexdigest()[:16]


def describe_differences(saved: dict, expected: dict) -> str:
    keys = sorted(set(saved) | set(expected))
    return "; ".join(f"{k}: cache has {saved.get(k)!r}, expected {expected.get(k)!r}"
                     for k in keys if saved.get(k) != expected.get(k))


def stale_reasons(saved: dict, expected: dict) -> str:
    """Why a cache's recorded components do not fit the expected ones ('' when they do); the layout keys are
    the cache's own choice, and only need to be recorded."""
    content = describe_differences({k: v for k, v in saved.items() if k not in LAYOUT_KEYS},
                                   {k: v for k, v in expected.items() if k not in LAYOUT_KEYS})
    unrecorded = [f"{k}: not recorded (an older cache format)" for k in LAYOUT_KEYS if k not in saved]
    return "; ".join(filter(None, [content, *unrecorded]))


def check_rows_per_shard(rows_per_shard) -> None:
    """A shard holds at least one row (`--rows-per-shard`); checked before any model loads."""
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be a positive number of rows, got {rows_per_shard!r}")


def shard_rows(s: int, n_rows: int, rows_per_shard: int) -> range:
    """The rows shard `s` holds: [s*R, min(N, (s+1)*R)); the last shard may be shorter."""
    return range(s * rows_per_shard, min(n_rows, (s + 1) * rows_per_shard))


def _write_json_atomic(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1))


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


# ---- writing ---------------------------------------------------------------------------------------
@torch.no_grad()
def build_cache(directory: str | Path, comps: dict, models: list, layers: list[list[int]], data, *,
                rank: int = 0, world: int = 1, rows_per_shard: int = 256, batch_size: int = 16,
                barrier=lambda: None, progress: bool = True) -> Path:
    """Compute (or finish computing) the cache of one split; returns its directory."""
    check_rows_per_shard(rows_per_shard)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recorded = {**comps, "rows_per_shard": rows_per_shard}
    if (directory / MANIFEST).exists():
        saved = json.loads((directory / MANIFEST).read_text())
        if saved["components"] == recorded:
            return directory
        raise CacheError(f"{directory} holds another cache ({describe_differences(saved['components'], recorded)}); "
                         "remove it or choose another train.states_cache_dir")
    check_compute_dtype(models, comps["compute_dtype"])
    devices = [next(model.parameters()).device for model in models]  # each model's batches go where it is
    on_rank0_agreed(rank, devices[0], lambda: _begin_or_resume(directory, recorded))
    for model, ls in zip(models, layers):
        truncate_after(model, max(ls))
    n_shards = math.ceil(len(data) / rows_per_shard)
    mine = [s for s in range(rank, n_shards, world) if not (directory / f"{shard_name(s)}.json").exists()]
    # disable=None: a progress bar on a terminal only
    for s in tqdm(mine, desc=f"caching {directory.name} (rank {rank})", disable=None if progress else True,
                  leave=False):
        rows = shard_rows(s, len(data), rows_per_shard)
        _write_shard(directory, s, rows, _compute_states(models, layers, devices, data, rows, batch_size,
                                                         DTYPES[comps["dtype"]]), rank)
    barrier()
    on_rank0_agreed(rank, devices[0], lambda: _write_manifest(directory, recorded, models, layers, len(data)))
    return directory


def check_compute_dtype(models: list, compute_dtype: str) -> None:
    """The components must name the dtype the states are really computed in."""
    for model in models:
        if next(model.parameters()).dtype != DTYPES[compute_dtype]:
            raise CacheError(f"an augmenting model computes in {next(model.parameters()).dtype}, but the cache "
                             f"records compute_dtype={compute_dtype!r}; load it in that dtype")


def on_rank0_agreed(rank: int, device, check) -> None:
    """Run `check` on rank 0; every rank raises when it failed, so no rank waits for a peer that gave up."""
    agreed = run_everywhere(check if rank == 0 else None, device, catch=(CacheError, OSError))  # also a barrier
    agreed.raise_failure(lambda first: CacheError(f"cache build stopped by {first}"))


def _begin_or_resume(directory: Path, recorded: dict) -> None:
    building = directory / BUILDING
    if building.exists() and json.loads(building.read_text()) != recorded:
        raise CacheError(f"{directory} holds a partial cache of other inputs "
                         f"({describe_differences(json.loads(building.read_text()), recorded)}); remove it first")
    _write_json_atomic(building, recorded)


def _compute_states(models, layers, devices, data, rows: range, batch_size: int, dtype) -> dict[str, torch.Tensor]:
    """One shard's tensors, computed in fixed micro-batches so every run writes the same bytes."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(rows.start, rows.stop, batch_size):
        batch = data.batch(list(range(start, min(rows.stop, start + batch_size))))
        if "augmenting_inputs" in batch:  # each model its own tokens of the text
            _add_own_readings(parts, models, layers, devices, batch["augmenting_inputs"], dtype)
            continue
        for a, (model, ls, device) in enumerate(zip(models, layers, devices)):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            positions = batch["position_ids"].to(device) if "position_ids" in batch else None  # packed rows
            states = capture_block_outputs(model, ls, ids, *backbone_inputs(mask, positions))
            for i in ls:
                parts.setdefault(f"a{a}.l{i}", []).append(states[i].to("cpu", dtype))
    out = {k: torch.cat(v).contiguous() for k, v in parts.items()}
    for key in [k for k in out if k.endswith(".offsets")]:  # token counts per row -> where each row starts
        out[key] = torch.cat([torch.zeros(1, dtype=torch.long), out[key].cumsum(0)])
    return out


def _add_own_readings(parts: dict, models, layers, devices, aligned: list, dtype) -> None:
    """Each model's states of its own reading (AugmentingInputs.model_inputs, as the composition runs it), the
    real tokens of every row back to back, and each row's token count ("a{a}.offsets", summed later)."""
    for a, (model, ls, device, inputs) in enumerate(zip(models, layers, devices, aligned)):
        ids, mask, positions = (t.to(device) for t in inputs.model_inputs())
        if mask.dim() == 4:
            mask = backbones.custom_attention_mask(model, mask)
        states = capture_block_outputs(model, ls, ids, mask, positions)
        real = inputs.attention_mask.bool().to(device)
        for i in ls:
            parts.setdefault(f"a{a}.l{i}", []).append(states[i][real].to("cpu", dtype))  # row after row
        parts.setdefault(f"a{a}.offsets", []).append(real.sum(1).cpu())


def _write_shard(directory: Path, s: int, rows: range, tensors: dict, rank: int) -> None:
    path = directory / f"{shard_name(s)}.safetensors"
    try:
        with replacing(path, aside=f".{path.name}.tmp") as tmp:  # one writer per shard: a rerun overwrites it
            save_safetensors(tensors, tmp)
        _write_json_atomic(directory / f"{shard_name(s)}.json", {"sha256": sha256_file(path), "first_row": rows.start,
                                                                 "rows": len(rows), "written_by_rank": rank})
    except OSError as e:
        raise CacheError(f"writing cache shard {path} failed: {e.strerror or e}; the shards already written "
                         "are kept, and a rerun resumes from them") from None


def _checked_sidecar(directory: Path, s: int, n_rows: int, rows_per_shard: int) -> dict:
    """Shard s's sidecar, refused unless it covers exactly the rows shard s must hold."""
    path = directory / f"{shard_name(s)}.json"
    if not path.is_file():
        raise CacheError(f"cache shard {s} was never finished ({path} is missing); rerun the cache job")
    sidecar, want = json.loads(path.read_text()), shard_rows(s, n_rows, rows_per_shard)
    if (sidecar.get("first_row"), sidecar.get("rows")) != (want.start, len(want)):
        raise CacheError(f"{path} covers {sidecar.get('rows')} rows from row {sidecar.get('first_row')}, but with "
                         f"rows_per_shard={rows_per_shard} shard {s} holds rows [{want.start}, {want.stop}); "
                         "remove the cache and rebuild it")
    return {"sha256": sidecar["sha256"], "rows": len(want)}


def _write_manifest(directory: Path, recorded: dict, models: list, layers: list[list[int]], n_rows: int) -> None:
    rows_per_shard = recorded["rows_per_shard"]
    shards = [_checked_sidecar(directory, s, n_rows, rows_per_shard)  # any world size: the same manifest
              for s in range(math.ceil(n_rows / rows_per_shard))]
    per_row = [None] if recorded.get("reading") == "characters" else [n_rows, recorded["seq_len"]]  # None: ragged
    shapes = {f"a{a}.l{i}": [*per_row, int(models[a].config.hidden_size)] for a, ls in enumerate(layers) for i in ls}
    _write_json_atomic(directory / MANIFEST, {"components": recorded, "fingerprint": fingerprint(recorded),
                                              "rows": n_rows, "shapes": shapes, "shards": shards})
    (directory / BUILDING).unlink(missing_ok=True)


# ---- reading ---------------------------------------------------------------------------------------
class StatesCache:
    """Memory-mapped reader of one split's cache; `read(rows)` gives the model's `augmenting_states`."""

    def __init__(self, directory: str | Path, expected: dict):
        self.directory = Path(directory)
        manifest_path = self.directory / MANIFEST
        if not manifest_path.is_file():
            raise CacheError(f"no complete cache at {self.directory} (run `calm-dist cache` first)")
        self.manifest = json.loads(manifest_path.read_text())
        reasons = stale_reasons(self.manifest["components"], expected)
        if reasons:
            raise CacheError(f"stale cache at {self.directory}: {reasons}; rebuild it (`calm-dist cache`)")
        self.rows_per_shard = self.manifest["components"]["rows_per_shard"]
        self._check_shard_rows()
        self.keys = [(int(k[1:].split(".")[0]), int(k.split(".l")[1]), k) for k in self.manifest["shapes"]]
        self.ragged = self.manifest["components"].get("reading") == "characters"
        self._handles: dict[int, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="states-prefetch")
        self._pending: dict[tuple, object] = {}

    def __len__(self) -> int:
        return self.manifest["rows"]

    def _check_shard_rows(self) -> None:
        """Every shard the manifest lists states the rows that `divmod(row, rows_per_shard)` sends to it."""
        n_shards = math.ceil(len(self) / self.rows_per_shard)
        if len(self.manifest["shards"]) != n_shards:
            raise CacheError(f"{self.directory / MANIFEST} lists {len(self.manifest['shards'])} shards; {len(self)} "
                             f"rows of {self.rows_per_shard} per shard need {n_shards}")
        for s, shard in enumerate(self.manifest["shards"]):
            want = shard_rows(s, len(self), self.rows_per_shard)
            if shard["rows"] != len(want):
                raise CacheError(f"{self.directory / MANIFEST}: shard {s} states {shard['rows']} rows, but holds rows "
                                 f"[{want.start}, {want.stop}) at {self.rows_per_shard} per shard")

    def verify(self, shards=None) -> None:
        """Check sizes and sha256 of the given shards (default: all) against the manifest."""
        for s in range(len(self.manifest["shards"])) if shards is None else shards:
            path = self.directory / f"{shard_name(s)}.safetensors"
            if not path.is_file():
                raise CacheError(f"cache shard {path} is missing")
            if sha256_file(path) != self.manifest["shards"][s]["sha256"]:
                raise CacheError(f"cache shard {path} is corrupted or truncated (checksum mismatch); rebuild the cache")

    def _shard(self, s: int):
        if s not in self._handles:
            handle = safe_open(str(self.directory / f"{shard_name(s)}.safetensors"), framework="pt")
            for a, _, key in self.keys:  # the file holds the rows its manifest entry states (header only)
                want = [self.manifest["shards"][s]["rows"], *self.manifest["shapes"][key][1:]]
                if self.ragged:  # its rows' tokens, as many as its offsets say
                    offsets = handle.get_slice(f"a{a}.offsets")
                    if list(offsets.get_shape()) != [want[0] + 1]:
                        raise CacheError(f"cache shard {self.directory / shard_name(s)}.safetensors holds "
                                         f"{offsets.get_shape()} offsets for {want[0]} rows")
                    want = [int(offsets[want[0]:want[0] + 1][0]), *self.manifest["shapes"][key][1:]]
                if list(handle.get_slice(key).get_shape()) != want:
                    raise CacheError(f"cache shard {self.directory / shard_name(s)}.safetensors holds {key} of shape "
                                     f"{list(handle.get_slice(key).get_shape())}, the manifest says {want}")
            self._handles[s] = handle
        return self._handles[s]

    def read(self, rows) -> list[dict[int, torch.Tensor]]:
        rows = [int(r) for r in rows]
        outside = [r for r in rows if not 0 <= r < len(self)]
        if outside:
            raise CacheError(f"rows {outside[:4]} are outside the {len(self)} rows cached at {self.directory}")
        out: list[dict[int, torch.Tensor]] = [{} for _ in {a for a, _, _ in self.keys}]
        for a, layer, key in self.keys:
            pieces = []
            for r in rows:
                s, within = divmod(r, self.rows_per_shard)
                if self.ragged:
                    start, stop = self._shard(s).get_slice(f"a{a}.offsets")[within:within + 2].tolist()
                    pieces.append(self._shard(s).get_slice(key)[start:stop])
                else:
                    pieces.append(self._shard(s).get_slice(key)[within:within + 1])
            # ragged rows padded with zeros on the right, never attended: the batch's augmenting mask is 0 there
            out[a][layer] = pad_sequence(pieces, batch_first=True) if self.ragged else torch.cat(pieces)
        return out

    def prefetch(self, rows) -> None:
        """Start reading rows in the background (the next micro-batch)."""
        key = tuple(int(r) for r in rows)
        if key not in self._pending:
            self._pending[key] = self._pool.submit(self.read, key)

    def get(self, rows) -> list[dict[int, torch.Tensor]]:
        future = self._pending.pop(tuple(int(r) for r in rows), None)
        return future.result() if future is not None else self.read(rows)


# ---- the job: `calm-dist cache --config ...` ---------------------------------------------------------
def cache_root(cfg) -> Path:
    return Path(cfg.train.states_cache_dir or Path(cfg.train.output_dir) / "augmenting_cache")


def expected_components(cfg, layer_pairs, data_fingerprint: str) -> dict:
    """The components of the configured run's cache; a hub id's weights are fingerprinted in its snapshot of the HF
    cache (preflight fetched it), like a local directory's."""
    revisions = cfg.model.augmenting_revisions or [None] * len(cfg.model.augmenting)
    directories = [local_path(name, revision, f"model.augmenting[{i}]")
                   for i, (name, revision) in enumerate(zip(cfg.model.augmenting, revisions))]
    return components(directories, revisions, used_augmenting_layers(layer_pairs), data_fingerprint,
                      cfg.data.seq_len, cfg.train.states_dtype, augmenting_compute_dtype(cfg),
                      by_characters=cfg.data.different_tokenizers)


def open_verified_caches(cfg, layer_pairs, train_data, eval_data, env: DistEnv, device
                         ) -> tuple[StatesCache, StatesCache | None]:
    """The train and eval caches (eval: None without eval data), refused when stale or corrupted before any
    weight loads. The ranks split the checksum work and agree on the verdict: every rank raises the same
    CacheError, naming the rank that found the problem. Collective."""
    caches = {split: StatesCache(cache_root(cfg) / split, expected_components(cfg, layer_pairs, data.fingerprint))
              for split, data in (("train", train_data), ("eval", eval_data)) if data is not None}

    def verify_share() -> None:
        for cache in caches.values():
            cache.verify(range(env.rank, len(cache.manifest["shards"]), env.world_size))
    run_everywhere(verify_share, device, catch=CacheError).raise_failure(CacheError, keep_own=lambda e: False)
    return caches["train"], caches.get("eval")


def splits(cfg) -> dict[str, list[tuple[str, str]]]:
    """Each split's sources as (key, spec): data.train's (several for a mixture), data.eval's."""
    train = [(key, spec) for key, spec, _ in cfg.data.train_sources()]
    return {"train": train, **({"eval": [("data.eval", cfg.data.eval)]} if cfg.data.eval else {})}


def split_rows(cfg, split: str, tokenizer: Tokenizer):
    """The rows preflight prepared for `split` (a mixture's rows in its global order), as the trainer reads them
    (with different tokenizers, each augmenting model's reading of the text too)."""
    augmenting = reading_tokenizers(cfg)
    if split == "train":
        rows = load_training_rows(cfg.data, tokenizer, data_cache_dir(cfg), is_writer=False, augmenting=augmenting)
    else:
        rows = load_rows(cfg.data, cfg.data.eval, "data.eval", tokenizer, data_cache_dir(cfg), is_writer=False,
                         augmenting=augmenting)
    return with_alignment(rows, cfg, augmenting)


def run_cache_job(cfg, env, resolved, rows_per_shard: int = 256, batch_size: int = 16) -> dict[str, Path]:
    """Cache every split; each rank computes its share of shards (no ZeRO: a forward-only job)."""
    check_rows_per_shard(rows_per_shard)
    distributed = env.world_size > 1
    if distributed:
        init_process_group(env, cfg.distributed.timeout_s)
    barrier = dist.barrier if distributed else (lambda: None)
    tokenizer = anchor_tokenizer(cfg)
    revisions = cfg.model.augmenting_revisions or [None] * len(cfg.model.augmenting)
    device = local_device(env)  # each rank its own GPU, where there is one
    lock_for_job(cache_root(cfg), "train.states_cache_dir", env.is_main, device)  # before anything is written there
    dtype = DTYPES[augmenting_compute_dtype(cfg)]  # the trainer's rule, never the checkpoint's own dtype
    models = [load_causal_lm(p, r, dtype, cfg.model.trust_remote_code, cfg.model.attn_implementation,
                             cfg.model.fused_kernels).eval().to(device)
              for p, r in zip(cfg.model.augmenting, revisions)]
    out = {}
    for split in splits(cfg):
        data = split_rows(cfg, split, tokenizer)
        comps = expected_components(cfg, resolved.layer_pairs, data.fingerprint)
        out[split] = build_cache(cache_root(cfg) / split, comps, models, used_augmenting_layers(resolved.layer_pairs),
                                 data, rank=env.rank, world=env.world_size, rows_per_shard=rows_per_shard,
                                 batch_size=batch_size, barrier=barrier, progress=env.is_main)
    shut_down_process_group()  # no-op in a single process
    return out


def estimate(cfg, resolved, *, flops_per_s: float, read_bytes_per_s: float, write_bytes_per_s: float) -> dict:
    """Disk size of the cache and the cache-vs-recompute break-even, from the cost model (no model is loaded)."""
    seq_len = cfg.data.seq_len
    tokens = {split: sum(part.num_rows() for key, spec in sources for part in open_source(spec, key)) * seq_len
              for split, sources in splits(cfg).items()}
    own = cfg.data.augmenting_len if cfg.data.different_tokenizers else None  # another tokenizer's own rows
    r = costs.augmenting_tokens_per_token(seq_len, own)  # augmenting tokens (tails estimated) per anchor token
    per_token = r * costs.cache_bytes_per_token(resolved.augmenting_configs, resolved.layer_pairs,
                                                dtype=cfg.train.states_dtype)
    aug_flops = r * sum(costs.augmenting_forward_flops(c, own or seq_len, max(i for i, _ in pairs))
                        for c, pairs in zip(resolved.augmenting_configs, resolved.layer_pairs))
    step = costs.step_cost(resolved.anchor_config, resolved.augmenting_configs, resolved.layer_pairs, seq_len=seq_len,
                           states="recompute", activation_checkpointing=cfg.train.activation_checkpointing,
                           augmenting_seq_len=own)
    econ = costs.cache_economics(aug_flops, per_token, flops_per_s=flops_per_s, read_bytes_per_s=read_bytes_per_s,
                                 write_bytes_per_s=write_bytes_per_s, tokens=tokens["train"])
    return {
        "bytes_per_token": per_token,
        "disk_bytes": {split: per_token * n for split, n in tokens.items()},
        "tokens": tokens,
        "augmenting_forward_share_of_step": aug_flops / step.total,
        "predicted_cached_over_recompute_step_flops": (step.total - aug_flops) / step.total,
        "break_even_epochs": econ.break_even_epochs,
        "assumed": {"flops_per_s": flops_per_s, "read_bytes_per_s": read_bytes_per_s,
                    "write_bytes_per_s": write_bytes_per_s},
    }
