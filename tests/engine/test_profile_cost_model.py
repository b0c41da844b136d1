"""scripts/profile_cost_model.py runs end to end on a tiny model (ragged steps with decode rows beside
a chunk, decode dispatches at full batch, K-step decodes reported apart) and writes a cost model the
scheduler can load, with its own decode base."""
import json
import os
import subprocess
import sys

from ferry.scheduler.cost_model import CostModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_profile_cost_model_smoke(tmp_path):
    out = tmp_path / "cm.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "profile_cost_model.py"), "--model",
                        "random:tiny", "--max-batch", "4", "--max-model-len", "64", "--repeats", "1",
                        "--output", str(out)], capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    cm = CostModel.load(str(out))
    data = json.loads(out.read_text())
    assert cm.base >= 0 and data.keys() >= {"base", "decode_base", "per_prefill_token", "per_decode_row"}
    assert cm.decode_base is not None                      # decode dispatches fitted apart from steps
    multi = [s for s in data["samples"] if "decode_steps" in s]   # K-step decodes, reported per iteration
    assert multi and all(s["seconds"] > 0 and s["prefill_tokens"] == 0 for s in multi)
