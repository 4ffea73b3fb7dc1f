"""The checkpoint protocol of a training job: every rank's part in saving, choosing, restoring and exporting.

Saving runs in phases (stage, write this rank's files, publish), each ending in an agreement among the ranks,
so an error on one rank stops every rank at once instead of leaving its peers in the next collective until the
timeout. The files and their publication on disk are `calm_dist.training.checkpoint`.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import deepspeed
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
import torch.distributed as dist

from calm_dist.config import OptimConfig
from calm_dist.console import say
from calm_dist.files import write_file
from calm_dist.model.composition import CONFIG_FILE, WEIGHTS_FILE, write_composition_files
from calm_dist.training.agreement import run_everywhere
from calm_dist.training.checkpoint import (CheckpointError, DamagedCheckpoint, file_hashes, latest_checkpoint,
                                           load_state, new_staging_dir, publish, read_trainer_state, rng_state,
                                           save_state, set_rng_state, staging_dir, verify_rank_share,
                                           write_index_part)
from calm_dist.training.dist_env import DistEnv
from calm_dist.faults import Faults


def gathered_composition(model, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The full composition weights on rank 0 (None elsewhere). Collective: ZeRO-3 gathers every shard (under
    ZeRO-2 every rank holds them whole and the gather does nothing)."""
    with deepspeed.zero.GatheredParameters(model.trainable_parameters(), modifier_rank=None):
        return model.composition_state_dict() if is_main else None


def apply_optim_config(optimizer, scheduler, o: OptimConfig) -> None:
    """Loading brings back the saved hyperparameters (LambdaLR's state holds base_lrs, the optimizer's its
    groups' lr, betas, eps, weight decay); train.resume_allow_changes may have changed them: this config's
    win. Unchanged, the values are those restored, bit for bit (lr = base_lr * factor, as LambdaLR computes)."""
    scheduler.base_lrs = [o.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(lr=o.lr * factor(scheduler.last_epoch), initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                     weight_decay=o.weight_decay)


class Checkpointer:
    """One rank's part in writing, choosing and restoring the checkpoints of `output_dir`. `choose`, `save` and
    `export` are collective: each phase that can fail on one rank ends in an agreement, so an error on any rank
    stops every rank at once, where a peer would otherwise wait in the next collective until the timeout."""

    def __init__(self, output_dir: str | Path, env: DistEnv, device: torch.device, keep_last: int, faults: Faults):
        self.output_dir, self.env, self.device = Path(output_dir), env, device
        self.keep_last, self.faults = keep_last, faults

    # ---- resume ----
    def choose(self, candidates: list[tuple[Path, str | None]]) -> Path | None:
        """The newest resume candidate intact on every rank (preflight's candidates, each with the problem it
        found or None). Each rank hashes its own files and a share of the shared ones, then all agree, so every
        rank resumes the same checkpoint."""
        env = self.env
        for i, (directory, known) in enumerate(candidates):
            if known is None:  # preflight found every rank's small shared files intact; now the large ones
                check = partial(verify_rank_share, directory, env.rank, env.world_size)
                agreed = run_everywhere(check, self.device, catch=DamagedCheckpoint)
                if not agreed.failed:
                    return directory
                known = agreed.first()
            if i + 1 == len(candidates):
                raise DamagedCheckpoint(f"cannot resume {directory}: {known}; no older checkpoint is intact")
            say(env.is_main, f"cannot resume {directory.name} ({known}): resuming from {candidates[i + 1][0].name} "
                "instead")
        return None

    def restore(self, directory: Path, optimizer, scheduler, optim: OptimConfig) -> dict:
        """This rank's optimizer partition, the scheduler, this config's optimizer hyperparameters and this rank's
        RNG states from `directory`; returns its trainer_state.json (step, MLflow run id)."""
        env = self.env
        state = read_trainer_state(directory)
        optimizer_state = load_state(directory, f"optimizer.rank{env.rank}")
        optimizer_state["loss_scaler"] = optimizer.loss_scaler
        states = [None] * env.world_size
        states[env.rank] = optimizer_state
        if isinstance(optimizer, DeepSpeedZeroOptimizer):  # ZeRO-2: the model holds whole trainable weights
            # this rank's fp32 partition as saved (not re-derived from bf16 weights), then every rank's partition
            # copied into the model's weights and all-gathered (collective)
            optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
            optimizer.update_lp_params()
        else:  # ZeRO-3 restores its fp32 partition and the weights' shards from it
            optimizer.load_state_dict(states, load_optimizer_states=True)
        scheduler.load_state_dict(state["scheduler"])
        apply_optim_config(optimizer, scheduler, optim)
        set_rng_state(load_state(directory, f"rng.rank{env.rank}"))
        say(env.is_main, f"resumed from {directory} at step {state['step']}")
        return state

    # ---- save ----
    def save(self, step: int, model, optimizer, state: dict, config_yaml: str) -> None:
        """Every rank writes and syncs its files into step_N.tmp; all agree it worked; rank 0 publishes.
        `state`: what trainer_state.json holds besides the step and world size."""
        is_main, staged = self.env.is_main, staging_dir(self.output_dir, step)
        self._phase(step, staged, partial(new_staging_dir, staged) if is_main else None)
        weights = gathered_composition(model, is_main)  # collective: outside the phases, which may end early
        self._phase(step, staged, partial(self._write_files, staged, step, model, weights, optimizer, state,
                                          config_yaml))
        self.faults.at("kill_in_checkpoint", step)
        dist.barrier()
        self._phase(step, staged, partial(publish, self.output_dir, step, self.keep_last) if is_main else None)

    def _phase(self, step: int, staged: Path, work) -> None:
        """This rank's `work` (None: nothing here but the agreement). On a failure anywhere rank 0 removes the
        staging directory; the failing rank raises its own error (an OSError such as a full disk as one
        CheckpointError line), the others a CheckpointError naming it; the last published checkpoint stands."""
        agreed = run_everywhere(work, self.device)
        if not agreed.failed:
            return
        if self.env.is_main:
            shutil.rmtree(staged, ignore_errors=True)

        def error(first: str) -> CheckpointError:
            previous = latest_checkpoint(self.output_dir)
            return CheckpointError(f"writing checkpoint step_{step} under {self.output_dir} failed on {first}; the "
                                   f"last published checkpoint ({previous.name if previous else 'none'}) is intact")
        agreed.raise_failure(error, keep_own=lambda e: not isinstance(e, OSError))

    def _write_files(self, staged: Path, step: int, model, weights, optimizer, state: dict, config_yaml: str) -> None:
        """This rank's files, each hashed by this rank right after it is written, then synced with its part of
        the index."""
        env = self.env
        optimizer_state = optimizer.state_dict()
        optimizer_state.pop("loss_scaler", None)  # an object; static for fp32/bf16, rebuilt on load
        # ZeRO-2's map of parameter names to fragments (dataclasses) serves DeepSpeed's universal checkpoints only
        optimizer_state.pop("param_slice_mappings", None)
        hashes = save_state(optimizer_state, staged, f"optimizer.rank{env.rank}")
        self.faults.at("raise_in_checkpoint", step)
        hashes |= save_state(rng_state(), staged, f"rng.rank{env.rank}")
        if env.is_main:
            write_composition_files(staged, weights, model.composition_config())
            hashes |= file_hashes(staged, [WEIGHTS_FILE, CONFIG_FILE])
            hashes["trainer_state.json"] = write_file(staged / "trainer_state.json", json.dumps(
                {"step": step, "world_size": env.world_size, **state}, indent=2))
            hashes["config.yaml"] = write_file(staged / "config.yaml", config_yaml)
        write_index_part(staged, env.rank, hashes)

    # ---- export ----
    def export(self, model, tracker, training: dict) -> Path:
        """The final composition in the core's save_composition format (a LoRA baseline: PEFT's adapter format),
        with its model card: <output_dir>/final (collective). `training`: what composition.json records of the
        run (data fingerprint, steps, final metrics, MLflow run)."""
        weights = gathered_composition(model, self.env.is_main)
        final = self.output_dir / "final"
        if self.env.is_main:
            model.save_composition(final, weights, training=training)
            tracker.log_artifact(final, artifact_path="composition")
        dist.barrier()
        return final
