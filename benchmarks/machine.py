"""What a benchmark result records about the machine it ran on (standard library only)."""
from __future__ import annotations

import datetime
import platform
import subprocess


def machine_info() -> dict:
    """Platform, date, CPU model, CPU count and ISA flags (lscpu), load average at the start."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu_model"] = fields.get("Model name", "").strip()
        info["cpus"] = fields.get("CPU(s)", "").strip()
        info["cores_per_socket"] = fields.get("Core(s) per socket", "").strip()
        flags = fields.get("Flags", "")
        info["isa"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split())
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return info
