"""What a run prints: rank 0 says one line per event, and the libraries keep quiet.

Every rank of a job writes to the same log, so only rank 0 prints progress (`say`); the libraries' own
chatter (DeepSpeed's and transformers' info logs, progress bars) would drown those lines.
"""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Silence DeepSpeed, torch.distributed, transformers, datasets and mlflow below warnings."""
    # imported here, not at the top: the CLI imports this module on paths that never load them, and
    # transformers must come after TRANSFORMERS_VERBOSITY is set (it reads it at import)
    import datasets

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level on import
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers", "datasets", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def say(is_main: bool, text: str) -> None:
    """One line on rank 0's console, flushed at once (a job log interleaves the ranks' output)."""
    if is_main:
        print(text, flush=True)


def duration(seconds: float) -> str:
    """2h05m, 3m12s, 41s: a time span as a person reads it in a log line."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(step: int, steps: int, metrics: dict[str, float], eta_s: float | None = None) -> str:
    """The console line of a logged step: a training step's loss, lr, gradient norm, throughput, peak memory
    (the most any rank used: host, and accelerator when there is one) and the time left (`eta_s`), or the eval
    metrics."""
    m = metrics
    if "train/loss" in m:
        mfu = f" | MFU {100 * m['train/mfu']:.1f}%" if "train/mfu" in m else ""
        memory = ""
        if "mem/peak_host_gib" in m:
            accelerator = (f", accelerator {m['mem/peak_accelerator_gib']:.2f}" if "mem/peak_accelerator_gib" in m
                           else "")
            memory = f" | peak mem GiB: host {m['mem/peak_host_gib']:.2f}{accelerator}"
        eta = f" | ETA {duration(eta_s)}" if eta_s is not None else ""
        return (f"step {step}/{steps} | loss {m['train/loss']:.4f} | lr {m['train/lr']:.2e} | "
                f"grad {m['train/grad_norm']:.3f} | {m['train/tokens_per_s']:,.0f} tok/s{mfu}{memory}{eta}")
    return f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in m.items())
