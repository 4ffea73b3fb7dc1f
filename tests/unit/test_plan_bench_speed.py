"""benchmarks/plan_bench.py's speed column (each process's speed probe, rank 0's, against the profile's) and
cpu_profile.py's choice among its two passes of fixed-cost steps. Synthetic reports, figures worked out by hand."""
import sys

import pytest

from tests.helpers.launch import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import cpu_profile  # noqa: E402
import plan_bench  # noqa: E402
import speed_probe  # noqa: E402


def run(tag: str, world: int, step_s: float, probe_s: float | None) -> dict:
    times = {"ckpt_off:cached": {"median_s": step_s, "wall_median_s": step_s * 1.1}}
    if probe_s is not None:
        times["speed_probe"] = {"median_s": probe_s, "wall_median_s": probe_s}
    # rank 1 waits in barriers while rank 0 probes: its probe entry is not the machine's speed
    other = {"ckpt_off:cached": {"median_s": step_s * 0.9, "wall_median_s": step_s * 1.1},
             "speed_probe": {"median_s": 0.001, "wall_median_s": 1.0}}
    return {"tag": tag, "world": world, "ranks": [{"times": times}] + [{"times": other}] * (world - 1)}


def option(tag: str, world: int) -> dict:
    return {"tag": tag, "world": world, "label": tag, "variant": "ckpt_off:cached", "predicted_s": 2.0,
            "others_cores": 0.0}


def test_speed_beside_each_process():
    # profiled at a probe of 0.100 s; the first process ran while the machine was 25% faster (probe 0.080 s), the
    # second 20% slower (probe 0.120 s), the third without a probe
    p9p = {"speed_probe_reference_s": 0.100,
           "runs": [run("fast", 1, 1.6, 0.080), run("slow", 2, 2.4, 0.120), run("unprobed", 1, 2.0, None)],
           "options": [option("fast", 1), option("slow", 2), option("unprobed", 1)]}
    plan_bench.derive(p9p)
    fast, slow, unprobed = p9p["options"]
    assert fast["error"] == pytest.approx(-0.2)
    assert fast["speed"] == pytest.approx(0.8)
    # two ranks: the slower rank's wall time (2.64 s) and CPU time (2.4 s), the speed from rank 0's probe alone
    assert slow["speed"] == pytest.approx(1.2)
    assert slow["error"] == pytest.approx(2.64 / 2.0 - 1)
    assert slow["error_cpu"] == pytest.approx(2.4 / 2.0 - 1)
    assert "speed" not in unprobed and unprobed["error"] == pytest.approx(0.0)
    table = plan_bench.markdown(plan_bench.common.SIZES["quick"], {"machine": {"date_utc": "now"}, "P9p": p9p})
    assert "| speed |" not in table  # one process without a probe: no column for the others either


def test_fixed_costs_fit_the_faster_pass():
    def step(name, rows, stage, s):
        return {"name": name, "rows": rows, "ds_config": stage, "step_s": s}
    first = [step("a2", 1, "zero3", 0.024), step("a2", 2, "zero3", 0.083), step("a8", 1, "zero3", 0.061)]
    second = [step("a2", 1, "zero3", 0.026), step("a2", 2, "zero3", 0.051), step("a8", 1, "zero3", 0.065)]
    chosen = {(r["name"], r["rows"]): r["step_s"] for r in cpu_profile.fastest_of_passes(first + second)}
    assert chosen == {("a2", 1): 0.024, ("a2", 2): 0.051, ("a8", 1): 0.061}


def test_profile_without_a_probe_gives_raw_errors_only():
    p9p = {"speed_probe_reference_s": speed_probe.reference_seconds({"machine": {}}),
           "runs": [run("a", 1, 2.2, 0.1)], "options": [option("a", 1)]}
    plan_bench.derive(p9p)
    assert p9p["options"][0]["error"] == pytest.approx(0.1)
    assert "speed" not in p9p["options"][0]


def test_probe_runs_and_times_both_halves():
    m = speed_probe.measure(repeats=2, probe=speed_probe.SpeedProbe(tokens=64, width=64, elementwise_bytes=1 << 16,
                                                                      passes=1))
    assert len(m["cpu_s"]) == 2
    # each sample is both halves; over two samples a median is their mean, so the medians add up exactly
    assert min(m["matmul_median_s"], m["elementwise_median_s"]) > 0
    assert m["median_s"] == pytest.approx(m["matmul_median_s"] + m["elementwise_median_s"], rel=1e-9)
    assert speed_probe.reference_seconds({"speed_probe": {"median_s": 0.12}}) == 0.12
