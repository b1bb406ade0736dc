"""What machine a benchmark ran on, in one place for every benchmark script (figures mean little without it)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """CPU, cores, GPU, versions and the load at the time of the call (other jobs on a shared machine skew times)."""
    import numpy as np
    import torch

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg": [round(v, 2) for v in os.getloadavg()],
    }


def describe_text(info: dict | None = None) -> str:
    info = info or describe()
    load = ", ".join(f"{v:.1f}" for v in info["load_avg"])
    return (
        f"{info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; Python {info['python']}, "
        f"numpy {info['numpy']}, torch {info['torch']} ({info['torch_threads']} thread(s)), {info['os']}; "
        f"load average at start {load}"
    )
