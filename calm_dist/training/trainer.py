"""The training loop: wires data, frozen models under ZeRO-3, the composition, checkpoints and tracking.

One step = `accumulation` micro-batches per rank. The loss of a step is the token-mean over the whole
global batch: every rank can count the global batch's loss tokens itself (the sampler is a pure
function of the step), so each micro-batch contributes sum(CE) * world * accumulation / N_global and
DeepSpeed's averaging over ranks and micro-steps turns that into exactly sum(CE) / N_global.
"""
from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from calm_dist.training import checkpoint as ckpt
from calm_dist.training.agreement import first_failure, gather_failures
from calm_dist.model.composition import ComposedModel
from calm_dist.config import Config
from calm_dist.data.tokenized import GlobalBatchSampler, Tokenizer, load_tokenized
from calm_dist.training.dist_env import DistEnv, init_process_group, local_device, shut_down_process_group, to_device
from calm_dist.training.ds_config import zero_stage
from calm_dist.training.parallelize import load_frozen_models, mark_zero3_leaf_blocks
from calm_dist.model.lm_loss import labelled_tokens
from calm_dist.training.locks import lock_for_job
from calm_dist.training.preflight import ResolvedRun

log = logging.getLogger("calm_dist")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class TrainResult:
    step: int
    losses: list[float]          # the global token-mean loss of each step run by this process
    final_dir: Path | None       # the exported composition (None when stopped early by a signal)
    stopped_by_signal: bool
    run_id: str | None


def lr_lambda(cfg: Config):
    o, total = cfg.optim, cfg.train.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def seed_all(seed: int) -> None:
    """torch (every device), numpy and python random: a step may draw from any of them, and an unseeded one
    starts from OS entropy, so two runs of one config would draw differently."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv, resolved: ResolvedRun):
        self.cfg, self.env, self.resolved = cfg, env, resolved
        self.output_dir = Path(cfg.train.output_dir)
        self.stop_requested = False

    # ---- set-up ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed

        cfg, env = self.cfg, self.env
        init_process_group(env, cfg.distributed.timeout_s)
        self.device = local_device(env)
        lock_for_job(self.output_dir, "train.output_dir", env.is_main, self.device)  # before anything is written there
        resume_from = self._choose_checkpoint()  # before any weight loads: a damaged checkpoint costs no loading
        seed_all(cfg.train.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = Tokenizer(cfg.data.tokenizer)
        self.train_data = self._tokenized(cfg.data.train)
        self.eval_data = self._tokenized(cfg.data.eval) if cfg.data.eval else None
        self.sampler = GlobalBatchSampler(len(self.train_data), self.global_batch_size, cfg.train.seed)

        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        self.model = self._build_model(dtype)
        if cfg.train.compile:  # before checkpointing wraps the blocks, so the recompute runs the compiled graph
            from calm_dist.training.parallelize import compile_frozen_blocks

            n = compile_frozen_blocks(self._frozen_models())
            if self.env.is_main:
                print(f"compiling {n} frozen decoder blocks (torch.compile, on their first call)", flush=True)
        if cfg.train.activation_checkpointing:
            from calm_dist.training.parallelize import checkpoint_anchor_blocks

            checkpoint_anchor_blocks(self.model)
        o = cfg.optim
        optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                      weight_decay=o.weight_decay)
        if cfg.distributed.zero3_leaf_blocks and zero_stage(self.resolved.ds_config) == 3:
            mark_zero3_leaf_blocks(self._frozen_models())
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=self.resolved.ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)))
        self._setup_flop_accounting()
        self.start_step, self.run_id = 0, None
        if resume_from is not None:
            self._restore(resume_from)
        self.tracker = self._tracker()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)

    def _frozen_models(self) -> list[torch.nn.Module]:
        """The frozen LMs held in this process (the anchor, and the augmenting models unless cached)."""
        if isinstance(self.model, ComposedModel):
            return [self.model.anchor, *self.model.augmenting]
        return [self.model.model]  # the LoRA baseline: the anchor under PEFT

    def _build_model(self, dtype):
        """The composition (or, for the LoRA baseline, the anchor with adapters); frozen weights in shards."""
        cfg, m = self.cfg, self.cfg.model
        cached = cfg.train.augmenting_states == "cached"
        if cached:  # refuse a stale or corrupted cache before loading any weight
            self.train_states, self.eval_states = self._open_states_caches()
        anchor, augmenting, self._hf_ds_config = load_frozen_models(
            cfg, self.resolved.ds_config, dtype, load_augmenting=not cached and m.method == "calm",
            is_main=self.env.is_main)
        torch.manual_seed(cfg.train.seed)  # the trainable weights' initial values depend on the seed alone
        composition_budget = None
        if cached:  # the augmenting weights are never loaded: their states come from disk
            augmenting = self.resolved.augmenting_configs
        if m.method == "lora":
            from calm_dist.model.baselines import LoRAAnchor, default_lora_targets, matched_lora_rank
            from calm_dist.model.cross_attention import block_parameter_count

            targets = m.lora_targets or default_lora_targets(anchor.config)
            composition_budget = sum(block_parameter_count(a.hidden_size, anchor.config.hidden_size) * len(pairs)
                                     for a, pairs in zip(self.resolved.augmenting_configs, self.resolved.layer_pairs))
            model = LoRAAnchor(anchor, m.lora_rank or matched_lora_rank(anchor, targets, composition_budget), targets)
        else:
            model = ComposedModel(anchor, augmenting, layer_pairs=self.resolved.layer_pairs, num_heads=m.num_heads,
                                  sources={"anchor_revision": m.anchor_revision,
                                           "augmenting_revisions": m.augmenting_revisions or [None] * len(augmenting)})
            model.blocks.to(dtype)
        if self.env.is_main:
            n = sum(p.numel() for p in model.trainable_parameters())
            print(f"{m.method}: {n:,} trainable parameters" +
                  (f" (composition budget {composition_budget:,})" if composition_budget else ""), flush=True)
        return model

    def _setup_flop_accounting(self) -> None:
        """Model FLOPs per token from the cost model (calm_dist/planning/costs.py), and this rank's peak, for MFU."""
        from calm_dist.planning import costs
        from calm_dist.planning.hardware import peak_flops_per_rank

        cfg = self.cfg
        self.flops_per_token = None
        if cfg.model.method == "calm":
            self.flops_per_token = costs.step_cost(
                self.resolved.anchor_config, self.resolved.augmenting_configs, self.resolved.layer_pairs, seq_len=cfg.data.seq_len,
                states=cfg.train.augmenting_states, activation_checkpointing=cfg.train.activation_checkpointing).total
        self.peak_flops = peak_flops_per_rank(cfg.train.precision, cfg.train.peak_tflops_per_rank) \
            * self.env.world_size

    def _summed_loss(self, batch, states) -> torch.Tensor:
        """One forward of the engine: the micro-batch's summed next-token loss (the composition computes it
        without materialising the logits), with the prefix-encoder ablation's key mask when asked for."""
        key_mask = None
        if self.cfg.model.augmenting_sees == "prompt":
            from calm_dist.model.baselines import prompt_key_mask

            key_mask = prompt_key_mask(batch["labels"])
        return self.engine(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                           augmenting_states=states, augmenting_key_mask=key_mask, loss_reduction="sum").loss

    @property
    def global_batch_size(self) -> int:
        return self.cfg.train.micro_batch_size * self.resolved.accumulation * self.env.world_size

    def _tokenized(self, path: str):
        """Validation already tokenized and saved it (calm_dist/training/preflight.py); every rank reads the arrays."""
        from calm_dist.training.preflight import data_cache_dir

        return load_tokenized(self.cfg.data, path, self.tokenizer, data_cache_dir(self.cfg), is_writer=False)

    def _tracker(self):
        from calm_dist.tracking.tracker import Tracker

        tracker = Tracker(self.cfg.tracking, is_main_process=self.env.is_main, output_dir=self.output_dir)
        tags = {"zero_stage": "3", "world_size": str(self.env.world_size),
                "augmenting_states": self.cfg.train.augmenting_states}
        rng = ckpt.rng_state()  # MLflow names a new run with python's random: tracking must not shift the run's draws
        self.run_id = tracker.start(self.cfg.to_dict(), run_id=self.run_id, tags=tags, resuming=self.start_step > 0)
        ckpt.set_rng_state(rng)
        if self.start_step == 0:
            tracker.log_dict(self.cfg.to_dict(), "config.json")
            tracker.log_dict(self.resolved.ds_config, "deepspeed_config.json")
        return tracker

    def _on_stop_signal(self, signum, frame):
        # every rank says where it runs: a job's log then shows which ranks the stop reached, on which node
        env = self.env
        log.warning("rank %d (local rank %d on %s): %s: checkpointing after this step, then exiting", env.rank,
                    env.local_rank, os.uname().nodename, signal.Signals(signum).name)
        self.stop_requested = True

    # ---- the loop -------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        t, losses, step = self.cfg.train, [], self.start_step
        stopped = False
        while step < t.steps:
            started = time.perf_counter()
            loss, tokens = self.train_step(step)
            step += 1
            losses.append(loss)
            elapsed = time.perf_counter() - started
            metrics = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
                       "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                       "train/tokens_per_s": tokens / elapsed, "train/step_s": elapsed}
            if self.flops_per_token:  # model FLOPs run over every position, padding included
                tflops = self.flops_per_token * self.global_batch_size * self.cfg.data.seq_len / elapsed / 1e12
                metrics.update({"train/tflops": tflops, "train/mfu": tflops * 1e12 / self.peak_flops})
            if step % t.log_every == 0 or step == t.steps:
                self._log(step, metrics)
            if self.eval_data is not None and t.eval_every and step % t.eval_every == 0 and step < t.steps:
                self._log(step, self.evaluate())
            from calm_dist.training.faults import maybe_fail

            maybe_fail("kill_after_step", step, self.env.rank)
            if (self._agree_to_stop() or step == t.stop_after_step) and step < t.steps:
                self.save_checkpoint(step)
                stopped = True
                break
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
                self.save_checkpoint(step)
        final_dir = None
        if not stopped:
            if self.eval_data is not None:
                self._log(step, self.evaluate())
            self.save_checkpoint(step)
            final_dir = self.export()
        self.tracker.close("KILLED" if stopped else "FINISHED")
        return TrainResult(step, losses, final_dir, stopped, self.run_id)

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (global token-mean loss, global real tokens)."""
        t, env = self.cfg.train, self.env
        global_idx = self.sampler.global_batch_indices(step)
        n_global = int(labelled_tokens(self.train_data.labels[torch.as_tensor(global_idx)]))
        scale = env.world_size * self.resolved.accumulation / max(1, n_global)
        local = torch.zeros(2, device=self.device)  # summed loss, real tokens: read once per step (no sync per micro-step)
        for micro in range(self.resolved.accumulation):
            if t.fail_at_step is not None and step == t.fail_at_step and env.rank == min(1, env.world_size - 1):
                raise RuntimeError(f"train.fail_at_step={step}: injected failure on rank {env.rank}")
            idx = self.sampler.micro_batch_indices(step, micro, env.rank, env.world_size, t.micro_batch_size)
            following = (step, micro + 1) if micro + 1 < self.resolved.accumulation else (step + 1, 0)
            upcoming = self.sampler.micro_batch_indices(*following, env.rank, env.world_size, t.micro_batch_size)
            batch = to_device(self.train_data.batch(idx), self.device)
            loss_sum = self._summed_loss(batch, self._states(idx, upcoming))
            self.engine.backward(loss_sum * scale)
            self.engine.step()
            local += torch.stack([loss_sum.detach().float(), batch["attention_mask"].sum().float()])
        dist.all_reduce(local)
        loss, tokens = local.tolist()
        return loss / max(1, n_global), int(tokens)

    def _open_states_caches(self):
        """Open and verify the train/eval caches; ranks split the checksum work and agree on the verdict."""
        from calm_dist.training.states_cache import CacheError, StatesCache, cache_root, expected_components

        caches = {}
        for split, data in (("train", self.train_data), ("eval", self.eval_data)):
            if data is not None:
                caches[split] = StatesCache(cache_root(self.cfg) / split,
                                            expected_components(self.cfg, self.resolved.layer_pairs, data.fingerprint))
        problem = None
        try:
            for cache in caches.values():
                cache.verify(range(self.env.rank, len(cache.manifest["shards"]), self.env.world_size))
        except CacheError as e:
            problem = e
        failures = gather_failures(problem, self.device)  # rank 0 reports what rank 1 found
        if failures:
            raise CacheError(first_failure(failures))
        return caches["train"], caches.get("eval")

    def _states(self, indices, upcoming=None):
        """Cached mode: the rows' augmenting states (and start reading the next micro-batch's)."""
        if self.cfg.train.augmenting_states != "cached":
            return None  # recompute: the model runs the augmenting models itself
        states = to_device(self.train_states.get(indices), self.device)
        if upcoming is not None:
            self.train_states.prefetch(upcoming)
        return states

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean eval loss; every rank runs the same number of forwards (ZeRO-3 gathers are collective)."""
        t, env, data = self.cfg.train, self.env, self.eval_data
        self.engine.eval()
        rows = list(range(env.rank, len(data), env.world_size))
        per_rank = math.ceil(len(data) / env.world_size)
        n_batches = math.ceil(per_rank / t.micro_batch_size)
        if t.eval_batches:
            n_batches = min(n_batches, t.eval_batches)
        total = torch.zeros(2, device=self.device)
        for b in range(n_batches):
            idx = rows[b * t.micro_batch_size:(b + 1) * t.micro_batch_size]
            weight = 1.0 if idx else 0.0
            batch_rows = idx or [0]  # a rank out of rows still joins the collective forward, its loss weighted 0
            batch = to_device(data.batch(batch_rows), self.device)
            states = (to_device(self.eval_states.read(batch_rows), self.device)
                      if self.cfg.train.augmenting_states == "cached" else None)
            loss_sum = self._summed_loss(batch, states)
            total += weight * torch.stack([loss_sum.float(), labelled_tokens(batch["labels"]).float()])
        dist.all_reduce(total)
        self.engine.train()
        loss_sum, tokens = total.tolist()
        loss = loss_sum / max(1.0, tokens)
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}

    def _agree_to_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _log(self, step: int, m: dict) -> None:
        """Rank 0: one progress line, <output_dir>/metrics.jsonl, and MLflow."""
        if not self.env.is_main:
            return
        import json

        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **m}) + "\n")
        self.tracker.log_metrics(m, step=step)
        if "train/loss" in m:
            mfu = f" | MFU {100 * m['train/mfu']:.1f}%" if "train/mfu" in m else ""
            print(f"step {step}/{self.cfg.train.steps} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | "
                  f"grad {m['train/grad_norm']:.3f} | {m['train/tokens_per_s']:,.0f} tok/s{mfu}", flush=True)
        else:
            print(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in m.items()), flush=True)

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _gathered_composition(self) -> dict[str, torch.Tensor] | None:
        import deepspeed

        params = self.model.trainable_parameters()
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return self.model.composition_state_dict() if self.env.is_main else None

    def save_checkpoint(self, step: int) -> None:
        """Every rank writes and syncs its files into step_N.tmp; all agree it worked; rank 0 publishes
        (checkpoint.py). Each phase that can fail on one rank ends in an agreement (_checkpoint_phase)."""
        from functools import partial

        from calm_dist.training.faults import maybe_fail

        env, staged = self.env, ckpt.staging_dir(self.output_dir, step)
        self._checkpoint_phase(step, staged, partial(ckpt.new_staging_dir, staged) if env.is_main else None)
        weights = self._gathered_composition()  # collective: outside the phases, which may end early on one rank
        self._checkpoint_phase(step, staged, partial(self._write_checkpoint_files, staged, step, weights))
        maybe_fail("kill_in_checkpoint", step, env.rank)
        dist.barrier()
        publish = partial(ckpt.publish, self.output_dir, step, self.cfg.train.keep_last)
        self._checkpoint_phase(step, staged, publish if env.is_main else None)

    def _checkpoint_phase(self, step: int, staged: Path, work) -> None:
        """This rank's `work` (None: nothing here but the agreement), then every rank learns whether it failed
        anywhere (gather_failures): an error of any kind on one rank stops every rank at once, where a peer
        would otherwise wait in the next collective until the timeout. The failing rank raises its own error
        (an OSError such as a full disk as one CheckpointError line), the others a CheckpointError naming it;
        the last published checkpoint stands."""
        failure = None
        try:
            if work is not None:
                work()
        except Exception as e:
            failure = e
        failures = gather_failures(failure, self.device)
        if not failures:
            return
        if self.env.is_main:
            import shutil

            shutil.rmtree(staged, ignore_errors=True)
        if failure is not None and not isinstance(failure, OSError):
            raise failure
        previous = ckpt.latest_checkpoint(self.output_dir)
        raise ckpt.CheckpointError(f"writing checkpoint step_{step} under {self.output_dir} failed on "
                                   f"{first_failure(failures)}; the last published checkpoint "
                                   f"({previous.name if previous else 'none'}) is intact") from failure

    def _write_checkpoint_files(self, staged: Path, step: int, weights) -> None:
        """This rank's files, each hashed by this rank right after it is written, then synced with its part of
        the index."""
        import json

        from calm_dist.model.composition import CONFIG_FILE, WEIGHTS_FILE, write_composition_files
        from calm_dist.training.faults import maybe_fail

        env = self.env
        optimizer_state = self.optimizer.state_dict()
        optimizer_state.pop("loss_scaler", None)  # an object; static for fp32/bf16, rebuilt on load
        hashes = ckpt.save_state(optimizer_state, staged, f"optimizer.rank{env.rank}")
        maybe_fail("raise_in_checkpoint", step, env.rank)
        hashes |= ckpt.save_state(ckpt.rng_state(), staged, f"rng.rank{env.rank}")
        if env.is_main:
            write_composition_files(staged, weights, self.model.composition_config())
            hashes |= ckpt.file_hashes(staged, [WEIGHTS_FILE, CONFIG_FILE])
            hashes["trainer_state.json"] = ckpt.write_text(staged / "trainer_state.json", json.dumps({
                "step": step, "world_size": env.world_size, "scheduler": self.scheduler.state_dict(),
                "mlflow_run_id": self.tracker.run_id, "global_batch_size": self.global_batch_size,
                "data_fingerprint": self.train_data.fingerprint}, indent=2))
            hashes["config.yaml"] = ckpt.write_text(staged / "config.yaml", self.cfg.to_yaml())
        ckpt.write_index_part(staged, env.rank, hashes)

    def _choose_checkpoint(self) -> Path | None:
        """The newest resume candidate intact on every rank. Each rank hashes its own files and a share of the
        shared ones, then all agree (gather_failures), so every rank resumes the same checkpoint."""
        candidates = self.resolved.resume_candidates
        for i, (directory, known) in enumerate(candidates):
            if known is None:  # validation found every rank's small shared files intact; now the large ones
                problem = None
                try:
                    ckpt.verify_rank_share(directory, self.env.rank, self.env.world_size)
                except ckpt.DamagedCheckpoint as e:
                    problem = e
                failures = gather_failures(problem, self.device)
                if not failures:
                    return directory
                known = first_failure(failures)
            if i + 1 == len(candidates):
                raise ckpt.DamagedCheckpoint(f"cannot resume {directory}: {known}; no older checkpoint is intact")
            if self.env.is_main:
                print(f"cannot resume {directory.name} ({known}): resuming from {candidates[i + 1][0].name} instead",
                      flush=True)
        return None

    def _restore(self, directory: Path) -> None:
        state = ckpt.read_trainer_state(directory)
        optimizer_state = ckpt.load_state(directory, f"optimizer.rank{self.env.rank}")
        optimizer_state["loss_scaler"] = self.optimizer.loss_scaler
        states = [None] * self.env.world_size
        states[self.env.rank] = optimizer_state
        self.optimizer.load_state_dict(states, load_optimizer_states=True)
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optim_config()
        ckpt.set_rng_state(ckpt.load_state(directory, f"rng.rank{self.env.rank}"))
        self.start_step, self.run_id = state["step"], state.get("mlflow_run_id")
        if self.env.is_main:
            print(f"resumed from {directory} at step {self.start_step}", flush=True)

    def _apply_optim_config(self) -> None:
        """Loading brings back the saved hyperparameters (LambdaLR's state holds base_lrs, the optimizer's its
        groups' lr, betas, eps, weight decay); train.resume_allow_changes may have changed them: this config's
        win. Unchanged, the values are those restored, bit for bit (lr = base_lr * factor, as LambdaLR computes)."""
        o, scheduler = self.cfg.optim, self.scheduler
        scheduler.base_lrs = [o.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group.update(lr=o.lr * factor(scheduler.last_epoch), initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay)

    def export(self) -> Path:
        """The final composition in the core's save_composition format: <output_dir>/final."""
        from calm_dist.model.composition import write_composition

        weights = self._gathered_composition()
        final = self.output_dir / "final"
        if self.env.is_main:
            write_composition(final, weights, self.model.composition_config())
            self.tracker.log_artifact(final, artifact_path="composition")
        dist.barrier()
        return final


def train(cfg: Config, env: DistEnv, resolved: ResolvedRun) -> TrainResult:
    trainer = Trainer(cfg, env, resolved)
    trainer.setup()
    try:
        result = trainer.run()
    except BaseException:
        trainer.tracker.close("FAILED")  # a crashed run must not stay RUNNING in MLflow
        raise
    shut_down_process_group()
    return result


def quiet_libraries() -> None:
    """Rank-0 discipline: one progress line, not DeepSpeed's and transformers' chatter."""
    import warnings

    import datasets

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level on import
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
