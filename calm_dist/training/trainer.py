"""The training loop: set-up, step, eval, log, checkpoint, stop. The rest is in the components it calls:
parallelize (the model under DeepSpeed), checkpoint (the checkpoint protocol), evaluator (the eval loss),
states_cache (cached augmenting states), faults (fault injection), tracking (MLflow).

One step = `accumulation` micro-batches per rank. The loss of a step is the token-mean over the whole
global batch: every rank can count the global batch's loss tokens itself (the sampler is a pure
function of the step), so each micro-batch contributes sum(CE) * world * accumulation / N_global and
DeepSpeed's averaging over ranks and micro-steps turns that into exactly sum(CE) / N_global.
"""
from __future__ import annotations

import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from calm_dist.config import Config
from calm_dist.console import progress_line
from calm_dist.data.aligned_rows import reading_tokenizers, with_alignment
from calm_dist.data.mixture import MixtureSampler
from calm_dist.data.prepare import load_rows, load_training_rows
from calm_dist.data.sampler import sampler_for
from calm_dist.data.text_records import training_completion_decoding
from calm_dist.data.tokenizer import anchor_tokenizer
from calm_dist.planning import costs
from calm_dist.planning.hardware import peak_flops_per_rank
from calm_dist.tracking.hf_env import log_checkpoints
from calm_dist.tracking.tracker import Tracker
from calm_dist.training import checkpoint as ckpt
from calm_dist.training.agreement import any_rank
from calm_dist.training.checkpointer import Checkpointer
from calm_dist.training.dist_env import DistEnv, init_process_group, local_device, shut_down_process_group, to_device
from calm_dist.training.ds_config import zero_stage
from calm_dist.training.evaluator import Evaluator
from calm_dist.faults import Faults
from calm_dist.training.locks import lock_for_job
from calm_dist.training.memory import peak_memory
from calm_dist.training.nodes import node_id, start_node_metrics
from calm_dist.training.parallelize import build_distributed_model
from calm_dist.training.preflight import ResolvedRun, data_cache_dir
from calm_dist.training.states_cache import open_verified_caches

log = logging.getLogger("calm_dist")
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


@dataclass
class TrainResult:
    step: int
    losses: list[float]          # the global token-mean loss of each step run by this process
    final_dir: Path | None       # the exported composition (None when stopped early by a signal)
    stopped_by_signal: bool
    run_id: str | None


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

    def setup(self) -> None:
        cfg, env, train_cfg = self.cfg, self.env, self.cfg.train
        init_process_group(env, cfg.distributed.timeout_s)
        self.device = local_device(env)
        lock_for_job(self.output_dir, "train.output_dir", env.is_main, self.device)  # before anything is written there
        self.faults = Faults(env.rank, env.world_size, train_cfg.fail_at_step)
        self.checkpointer = Checkpointer(self.output_dir, env, self.device, train_cfg.keep_last, self.faults)
        resume_from = self.checkpointer.choose(self.resolved.resume_candidates)  # a damaged one costs no loading
        seed_all(train_cfg.seed)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._load_data()
        self.train_states = eval_states = None
        if train_cfg.augmenting_states == "cached":  # refuse a stale or corrupted cache before loading any weight
            self.train_states, eval_states = open_verified_caches(cfg, self.resolved.layer_pairs, self.train_data,
                                                                  self.eval_data, env, self.device)
        self.model = build_distributed_model(cfg, self.resolved, env.is_main)
        self.evaluator = None if self.eval_data is None else Evaluator(
            self.model, self.eval_data, eval_states, env, self.device, train_cfg.micro_batch_size,
            train_cfg.eval_batches)
        self.flops_per_token = costs.step_cost(
            self.resolved.anchor_config, self.resolved.augmenting_configs, self.resolved.layer_pairs,
            seq_len=cfg.data.seq_len, states=train_cfg.augmenting_states,
            activation_checkpointing=train_cfg.activation_checkpointing,
            augmenting_seq_len=cfg.data.augmenting_len if cfg.data.different_tokenizers else None
        ).total if cfg.model.method == "calm" else None  # for MFU; the cost model covers the composition only
        self.peak_flops = peak_flops_per_rank(train_cfg.precision, train_cfg.peak_tflops_per_rank) * env.world_size
        self.start_step, self.run_id = 0, None
        if resume_from is not None:
            state = self.checkpointer.restore(resume_from, self.model.optimizer, self.model.scheduler, cfg.optim)
            self.start_step, self.run_id = state["step"], state.get("mlflow_run_id")
        self.tracker = self._tracker()
        # every node's system metrics into this run (collective: rank 0 shares the run id)
        self.node_metrics = start_node_metrics(env, self.tracker.run_id, cfg.tracking, self.output_dir, self.device,
                                               resuming=self.start_step > 0)
        self.final_metrics: dict[str, float] = {}  # rank 0: the last logged value of each metric
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)

    def _load_data(self) -> None:
        """Every rank opens the token shards preflight prepared; rows are read a micro-batch at a time."""
        cfg = self.cfg
        tokenizer = anchor_tokenizer(cfg)  # as preflight resolved it: data.tokenizer, else the anchor's
        augmenting = reading_tokenizers(cfg)  # with different tokenizers: each augmenting model's own
        rows = load_training_rows(cfg.data, tokenizer, data_cache_dir(cfg), is_writer=False, augmenting=augmenting)
        eval_rows = load_rows(cfg.data, cfg.data.eval, "data.eval", tokenizer, data_cache_dir(cfg), is_writer=False,
                              augmenting=augmenting) if cfg.data.eval else None
        self.sampler = sampler_for(rows, self.global_batch_size, cfg.train.seed)
        self.train_data = with_alignment(rows, cfg, augmenting)
        self.eval_data = with_alignment(eval_rows, cfg, augmenting)
        if isinstance(self.sampler, MixtureSampler) and self.env.is_main:
            shares = ", ".join(f"{name}: {q} of {self.global_batch_size} rows" for name, q in
                               zip(self.train_data.names, self.sampler.quotas))
            print(f"data.train mixture, every global batch: {shares}", flush=True)

    @property
    def global_batch_size(self) -> int:
        return self.cfg.train.micro_batch_size * self.resolved.accumulation * self.env.world_size

    def _tracker(self) -> Tracker:
        tracker = Tracker(self.cfg.tracking, is_main_process=self.env.is_main, output_dir=self.output_dir,
                          node_id=node_id(self.env))
        tags = {"zero_stage": str(zero_stage(self.resolved.ds_config)), "world_size": str(self.env.world_size),
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
        train_cfg, losses, step = self.cfg.train, [], self.start_step
        stopped, loop_started = False, time.perf_counter()
        while step < train_cfg.steps:
            started = time.perf_counter()
            self.faults.at("raise_in_step", step)
            loss, tokens = self.train_step(step)
            step += 1
            losses.append(loss)
            elapsed = time.perf_counter() - started
            metrics = {"train/loss": loss, "train/lr": self.model.scheduler.get_last_lr()[0],
                       "train/grad_norm": float(self.model.engine.get_global_grad_norm() or 0.0),
                       "train/tokens_per_s": tokens / elapsed, "train/step_s": elapsed}
            if isinstance(self.sampler, MixtureSampler):  # each source's share of the step's loss tokens
                by_source = self.train_data.labelled_tokens_by_source(self.sampler.global_batch_indices(step - 1))
                metrics.update({f"train/share_source_{k}": n / max(1, sum(by_source))
                                for k, n in enumerate(by_source)})
            if self.flops_per_token:  # model FLOPs run over every position, padding included
                tflops = self.flops_per_token * self.global_batch_size * self.cfg.data.seq_len / elapsed / 1e12
                metrics.update({"train/tflops": tflops, "train/mfu": tflops * 1e12 / self.peak_flops})
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                metrics.update(peak_memory(self.device))  # collective: every rank logs at the same steps
                per_step = (time.perf_counter() - loop_started) / (step - self.start_step)  # evals, checkpoints too
                self._log(step, metrics, eta_s=per_step * (train_cfg.steps - step))
            last = step == train_cfg.steps
            if self.evaluator is not None and train_cfg.eval_every and step % train_cfg.eval_every == 0 and not last:
                self._log(step, self.evaluator.evaluate())
            self.faults.at("kill_after_step", step)
            if (any_rank(self.stop_requested, self.device) or step == train_cfg.stop_after_step) and not last:
                self.save_checkpoint(step)
                stopped = True
                break
            if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0 and not last:
                self.save_checkpoint(step)
        final_dir = None
        if not stopped:
            if self.evaluator is not None:
                self._log(step, self.evaluator.evaluate())
            self.save_checkpoint(step)
            final_dir = self.checkpointer.export(self.model.module, self.tracker, self._training_record(step))
        self.tracker.close("KILLED" if stopped else "FINISHED")
        self.stop_node_metrics()
        return TrainResult(step, losses, final_dir, stopped, self.run_id)

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimizer step; returns (global token-mean loss, global real tokens)."""
        train_cfg, env, engine = self.cfg.train, self.env, self.model.engine
        global_idx = self.sampler.global_batch_indices(step)
        n_global = self.train_data.labelled_tokens(global_idx)
        scale = env.world_size * self.resolved.accumulation / max(1, n_global)
        local = torch.zeros(2, device=self.device)  # summed loss, real tokens: read once per step, not per micro-step
        for micro in range(self.resolved.accumulation):
            idx = self.sampler.micro_batch_indices(step, micro, env.rank, env.world_size, train_cfg.micro_batch_size)
            following = (step, micro + 1) if micro + 1 < self.resolved.accumulation else (step + 1, 0)
            upcoming = self.sampler.micro_batch_indices(*following, env.rank, env.world_size,
                                                        train_cfg.micro_batch_size)
            batch = to_device(self._batch(idx, upcoming), self.device)
            loss_sum = self.model.summed_loss(batch, self._states(idx, upcoming))
            engine.backward(loss_sum * scale)
            engine.step()
            local += torch.stack([loss_sum.detach().float(), batch["attention_mask"].sum().float()])
        dist.all_reduce(local)
        loss, tokens = local.tolist()
        return loss / max(1, n_global), int(tokens)

    def _batch(self, indices, upcoming) -> dict:
        """The micro-batch's rows; with different tokenizers the next one's alignment is started (AlignedRows)."""
        if not hasattr(self.train_data, "prefetch"):
            return self.train_data.batch(indices)
        batch = self.train_data.get(indices)
        self.train_data.prefetch(upcoming)
        return batch

    def _states(self, indices, upcoming):
        """Cached mode: the rows' augmenting states, and the next micro-batch's read started; None when the
        model recomputes them."""
        if self.train_states is None:
            return None
        states = to_device(self.train_states.get(indices), self.device)
        self.train_states.prefetch(upcoming)
        return states

    def _log(self, step: int, metrics: dict, eta_s: float | None = None) -> None:
        """Rank 0: one progress line, <output_dir>/metrics.jsonl, and MLflow."""
        if not self.env.is_main:
            return
        with open(self.output_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tracker.log_metrics(metrics, step=step)
        self.final_metrics.update(metrics)
        print(progress_line(step, self.cfg.train.steps, metrics, eta_s), flush=True)

    def _training_record(self, step: int) -> dict:
        """What the export's composition.json and model card record of this run (rank 0's values)."""
        final = {k: v for k, v in self.final_metrics.items() if k == "train/loss" or k.startswith("eval/")}
        tracker = self.tracker
        data = self.cfg.data
        # calm-dist eval and generate decode it across tokenizers, each read as in training, and the new ids made
        # text as the training records read (from their first records, on every rank: O(1) in the corpus)
        across = ({"different_tokenizers": True, "tokenizers": {"anchor": data.tokenizer,
                                                                "augmenting": data.augmenting_tokenizers},
                   "completion_decoding": training_completion_decoding(data, anchor_tokenizer(self.cfg))}
                  if data.different_tokenizers and self.cfg.model.method == "calm" else {})
        return {"steps": step, "data_fingerprint": self.train_data.fingerprint, "final_metrics": final, **across,
                "mlflow": {"run_id": tracker.run_id, "experiment": tracker.experiment,
                           "tracking_uri": tracker.tracking_uri}}

    def stop_node_metrics(self) -> None:
        if self.node_metrics is not None:
            self.node_metrics.stop()
            self.node_metrics = None

    def save_checkpoint(self, step: int) -> None:
        model = self.model
        state = {"scheduler": model.scheduler.state_dict(), "mlflow_run_id": self.tracker.run_id,
                 "global_batch_size": self.global_batch_size, "data_fingerprint": self.train_data.fingerprint}
        self.checkpointer.save(step, model.module, model.optimizer, state, self.cfg.to_yaml())
        if log_checkpoints():  # HF_MLFLOW_LOG_ARTIFACTS, as transformers' MLflowCallback.on_save (rank 0 only)
            self.tracker.log_artifact(ckpt.step_dir(self.output_dir, step), artifact_path=f"checkpoints/step_{step}")


def train(cfg: Config, env: DistEnv, resolved: ResolvedRun) -> TrainResult:
    trainer = Trainer(cfg, env, resolved)
    trainer.setup()
    try:
        result = trainer.run()
    except BaseException:
        trainer.tracker.close("FAILED")  # a crashed run must not stay RUNNING in MLflow
        trainer.stop_node_metrics()
        raise
    shut_down_process_group()
    return result
