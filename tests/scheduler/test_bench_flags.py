"""scripts/bench_serving.py refuses, in real engine mode, the flags that mode would ignore."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "bench_serving.py")
TRACE = os.path.join(ROOT, "benchmarks", "traces", "bursty_cpu_40.jsonl")


@pytest.mark.parametrize("flags", [["--chunk", "128"], ["--cost-model", "cpu"], ["--page-size", "8"],
                                   ["--host-pages", "64"]])
def test_real_mode_refuses_ignored_flags(tmp_path, flags):
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, SCRIPT, "--trace", TRACE, "--output", str(out), *flags],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and flags[0] in r.stderr and "would ignore" in r.stderr, r.stderr
    assert not out.exists()


def test_simulate_mode_accepts_them_and_records_them(tmp_path):
    """Positive control: the same flags are used (and recorded) by the simulator."""
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, SCRIPT, "--trace", TRACE, "--output", str(out), "--simulate", "--policy", "fcfs",
                    "--chunk", "128", "--cost-model", "cpu", "--page-size", "8", "--host-pages", "64",
                    "--max-batch", "2"], check=True, capture_output=True, timeout=120)
    cfg = json.loads(out.read_text())["config"]
    assert (cfg["chunk"], cfg["cost_model"], cfg["page_size"], cfg["host_pages"]) == (128, "cpu", 8, 64)


def _command_flags(command: str) -> dict:
    """``--flag value`` pairs of a bench_serving command line (bare flags map to True)."""
    words = command.replace("`", "").split()
    flags, i = {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else None
            if nxt is None or nxt.startswith("--"):
                flags[w[2:].replace("-", "_")] = True
                i += 1
            else:
                flags[w[2:].replace("-", "_")] = nxt
                i += 2
        else:
            i += 1
    return flags


def _mismatches(command: str, result: dict) -> list:
    cfg = result["config"]
    out = []
    for k, v in _command_flags(command).items():
        if k in ("trace", "output", "plot"):
            continue
        if k not in cfg:
            out.append((k, v, "not recorded"))
        elif v is not True and str(cfg[k]) != v and not (isinstance(cfg[k], float) and cfg[k] == float(v)):
            out.append((k, v, cfg[k]))
    if "trace" in _command_flags(command) and os.path.basename(_command_flags(command)["trace"]) != result["trace"]:
        out.append(("trace", _command_flags(command)["trace"], result["trace"]))
    return out


@pytest.mark.parametrize("name", ["engine_cpu_bursty.json", "sim_bursty_cpu_40.json", "sim_heavy_tail.json"])
def test_results_readme_commands_match_the_recorded_config(name):
    results = os.path.join(ROOT, "benchmarks", "results")
    row = next(line for line in open(os.path.join(results, "README.md")) if f"`{name}`" in line)
    command = next(cell for cell in row.split("|") if "scripts/bench_serving.py" in cell)
    result = json.load(open(os.path.join(results, name)))
    assert _mismatches(command.split("`python ", 1)[1].split("`", 1)[0], result) == []


def test_command_check_positive_control():
    """The README command this repository used to carry (starve limit 60, --chunk) is caught."""
    result = json.load(open(os.path.join(ROOT, "benchmarks", "results", "engine_cpu_bursty.json")))
    old = ("scripts/bench_serving.py --trace benchmarks/traces/bursty_cpu_40.jsonl --policy both --max-batch 2 "
           "--max-model-len 640 --chunk 128 --base-quantum 0.5 --starve-limit 60 --output x")
    assert {m[0] for m in _mismatches(old, result)} == {"chunk", "starve_limit"}
