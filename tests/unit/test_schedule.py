"""The learning-rate schedule (parallelize.lr_lambda) against values written out by hand."""
import math

import pytest
import torch

from calm_dist.config import Config
from calm_dist.training.parallelize import lr_lambda


def factors(steps: int, warmup: int, schedule: str = "cosine", min_lr_ratio: float = 0.1, upto: int | None = None):
    cfg = Config()
    cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio = \
        steps, warmup, schedule, min_lr_ratio
    f = lr_lambda(cfg)
    return [f(step) for step in range(steps + 1 if upto is None else upto)]


def test_linear_warmup_then_cosine_down_to_min_lr_ratio():
    # 10 steps, 2 of warmup: the cosine spans steps 2..10 (8 steps); 0.1 + 0.45 * (1 + cos(pi * progress))
    assert factors(10, 2, upto=13) == pytest.approx([
        0.5, 1.0,                                   # warmup: (step + 1) / 2
        1.0, 0.96574579, 0.86819805, 0.72220754,    # progress 0, 1/8, 2/8, 3/8
        0.55,                                       # progress 1/2: half way between 1 and 0.1
        0.37779245, 0.23180195, 0.13425421, 0.1,    # progress 5/8 .. 1
        0.1, 0.1], abs=1e-8)                        # past the end: held at min_lr_ratio


def test_cosine_to_zero_without_warmup():
    assert factors(4, 0, min_lr_ratio=0.0) == pytest.approx([1.0, 0.85355339, 0.5, 0.14644661, 0.0], abs=1e-8)


def test_constant_after_warmup():
    assert factors(6, 3, schedule="constant") == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_the_optimizer_steps_with_these_rates():
    """LambdaLR as the trainer builds it: optimizer step k runs at lr * factor(k)."""
    cfg = Config()
    cfg.train.steps, cfg.optim.warmup_steps, cfg.optim.lr = 10, 2, 3e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    used = []
    for _ in range(4):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi / 8)))])
