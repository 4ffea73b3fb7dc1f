"""Entry point: `deepspeed --num_gpus N calm_dist/train.py --config recipe.yaml [key=value ...]`.

Also runs under torchrun, `accelerate launch --multi_gpu` (torchrun underneath; the README has the command),
one `srun` task per rank, or as a single process.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by a launcher: make `calm_dist` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calm_dist.config import ConfigError, load_config  # noqa: E402
from calm_dist.console import quiet_libraries  # noqa: E402
from calm_dist.training.dist_env import DistEnv, run_then_exit  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a CALM composition under DeepSpeed ZeRO-3.")
    parser.add_argument("--config", help="a YAML recipe: a path, or a shipped recipe's name (tiny)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    # Modules that import torch, transformers and deepspeed (seconds) load late: preflight once the config
    # loads, the trainer once preflight accepts it, so a refused argument or config never waits for them.
    try:
        env = DistEnv.from_environ()
        cfg = load_config(args.config, args.overrides)
        from calm_dist.training.preflight import preflight

        resolved = preflight(cfg, env)
    except ConfigError as e:
        print(f"calm_dist: config error: {e}", file=sys.stderr)
        return 2
    from calm_dist.model.composition import CompositionError
    from calm_dist.training.checkpoint import CheckpointError
    from calm_dist.training.states_cache import CacheError
    from calm_dist.training.trainer import train

    quiet_libraries()
    try:
        result = train(cfg, env, resolved)
    except (ConfigError, CacheError, CompositionError) as e:  # bad inputs found while setting up: no traceback
        print(f"calm_dist: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:  # e.g. the disk filled up: say so in one line; the last checkpoint stands
        print(f"calm_dist: checkpoint error: {e}", file=sys.stderr)
        return 1
    if env.is_main and result.final_dir is not None:
        print(f"done: step {result.step}, composition exported to {result.final_dir}", flush=True)
    return 0


if __name__ == "__main__":
    run_then_exit(main)
