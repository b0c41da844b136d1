"""What every benchmark JSON records about where it ran, and how it is written."""
import json
import os
import platform


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or 'cpu'}"


def write_json(path: str | None, res: dict) -> None:
    """Write ``res`` to ``path`` (no-op for None) and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
        print(f"wrote {path}")
