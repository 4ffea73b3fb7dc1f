"""`accelerate launch`, exactly as the README writes it, trains 2 CPU ranks over gloo on 127.0.0.1, with a
DeepSpeed JSON written for HF Trainer ("auto" everywhere the config tree decides).

Without a GPU accelerate starts several processes only with `--multi_gpu` (torchrun underneath: `--cpu` with
more than one process hands over to mpirun) or a config file; the README's command is the `--multi_gpu` one."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from calm_dist.training.dist_env import free_port
from tests.helpers.launch import REPO, base_env
from tests.helpers.tiny import tiny_setup

HF_JSON = REPO / "tests" / "fixtures" / "hf_trainer_zero3.json"
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def readme_command() -> list[str]:
    """The README's one `accelerate launch` command, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = [line for line in text.splitlines() if line.startswith("accelerate launch ")]
    assert len(commands) == 1, commands
    return shlex.split(commands[0], comments=True)


@pytest.mark.slow
def test_the_readme_accelerate_command_trains_two_cpu_ranks_with_an_hf_trainer_deepspeed_json(tmp_path):
    argv = readme_command()
    assert argv[:2] == ["accelerate", "launch"] and "--multi_gpu" in argv
    assert argv[argv.index("--num_processes") + 1] == "2" and argv[argv.index("--main_process_ip") + 1] == "127.0.0.1"
    argv[0] = str(Path(sys.executable).parent / "accelerate")  # this interpreter's accelerate
    argv[argv.index("--main_process_port") + 1] = str(free_port())  # the README's 29500 may be taken here

    tiny = tiny_setup(tmp_path / "tiny", n_train=64, n_eval=8)
    out = tmp_path / "run"
    overrides = {"model.anchor": tiny / "anchor", "model.augmenting": f"[{tiny / 'augmenting'}]",
                 "data.train": tiny / "train.jsonl", "data.eval": tiny / "eval.jsonl",
                 "data.tokenizer": tiny / "tokenizer.model", "data.cache_dir": tmp_path / "cache",
                 "train.output_dir": out, "train.steps": 3, "train.log_every": 1, "tracking.enabled": "false",
                 "distributed.deepspeed_config": HF_JSON}
    env = base_env(HF_HOME=tmp_path / "hf")  # no accelerate config of this machine's user is read
    for name in RANK_VARIABLES:
        env.pop(name, None)
    proc = subprocess.run([*argv, *(f"{k}={v}" for k, v in overrides.items())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    assert "done: step 3" in proc.stdout
    state = json.loads((out / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert {p.name for p in (out / "checkpoints" / "step_3").glob("optimizer.rank*.safetensors")} == {
        "optimizer.rank0.safetensors", "optimizer.rank1.safetensors"}
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) == 3
