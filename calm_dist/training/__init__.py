"""Training at scale: preflight checks, ranks and DeepSpeed ZeRO-3, the loop, checkpoints, the states cache."""
