"""What every benchmark JSON records about where it ran, and how it is written."""
import json
import os
import platform
import sys


def machine() -> str:
    """The host, plus the accelerator when JAX is already loaded and sees one (never imports JAX:
    the simulator's scripts stay pure Python)."""
    host = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    jax = sys.modules.get("jax")
    if jax is not None and jax.default_backend() != "cpu":
        devs = jax.devices()
        host += f"; {len(devs)} x {devs[0].device_kind}"
    return host


def write_json(path: str | None, res: dict) -> None:
    """Write ``res`` to ``path`` (no-op for None) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {path}")
