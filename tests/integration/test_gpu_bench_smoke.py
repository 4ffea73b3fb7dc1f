"""benchmarks/gpu.sh in its CPU smoke mode: the GPU benchmark's code path (ZeRO-3 or ZeRO-2 on one rank, leaf blocks,
all three variants, compiled or not) runs end to end here, so the script cannot rot between GPU sessions."""
import json
import subprocess
import sys

import pytest

from tests.helpers.launch import REPO, base_env, free_port

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("compile_blocks,stage", [("0", "3"), ("1", "3"), ("0", "2")])
def test_gpu_benchmark_smoke_mode_runs_every_variant(tmp_path, compile_blocks, stage):
    """ZERO=2: the engine the trainer builds for distributed.deepspeed_config=zero2 (frozen weights whole)."""
    env = base_env(GPU_BENCH_SMOKE=1, COMPILE=compile_blocks, ZERO=stage, OUT=tmp_path, PYTHON=sys.executable,
                   MASTER_PORT=free_port(), STEPS=1)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["errors"] == {} and result["zero_stage"] == int(stage) and result["zero3"] == (stage == "3")
    assert result["compile"] == (compile_blocks == "1")
    assert result["optimizer"] == {"2": "DeepSpeedZeroOptimizer", "3": "DeepSpeedZeroOptimizer_Stage3"}[stage]
    for variant in ("recompute", "cached", "anchor_alone"):
        assert result[variant]["step_s_median"] > 0
    flops = {v: result[v]["model_flops_per_token"] for v in ("cached", "recompute")}
    assert result["P2_predicted"] == pytest.approx(flops["cached"] / flops["recompute"])
