"""checkpoint.rng_state / set_rng_state through a checkpoint file: torch, numpy and python random continue
exactly where they were saved, half-used Gaussian pairs included."""
import random

import numpy as np
import pytest
import torch

from calm_dist.training import checkpoint as ckpt
@pytest.fixture(autouse=True)
def keep_the_global_rngs():
    saved = ckpt.rng_state()
    yield
    ckpt.set_rng_state(saved)


def draws() -> list:
    return [torch.rand(3).tolist(), torch.randn(2).tolist(), np.random.rand(3).tolist(),
            np.random.standard_normal(3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)]


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    draws()  # odd numbers of Gaussians: numpy and python each hold the second of a pair
    ckpt.save_state(ckpt.rng_state(), tmp_path, "rng.rank0")
    expected = draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    assert draws() != expected
    ckpt.set_rng_state(ckpt.load_state(tmp_path, "rng.rank0"))
    assert draws() == expected


@pytest.mark.parametrize("generator", ["torch", "numpy", "python"])
def test_each_generator_is_restored(tmp_path, generator):
    """Each generator on its own: one not restored fails its own case."""
    ckpt.save_state(ckpt.rng_state(), tmp_path, "rng.rank0")
    draw = {"torch": lambda: torch.rand(4).tolist(), "numpy": lambda: np.random.rand(4).tolist(),
            "python": lambda: [random.random() for _ in range(4)]}[generator]
    expected = draw()
    draw()
    ckpt.set_rng_state(ckpt.load_state(tmp_path, "rng.rank0"))
    assert draw() == expected
