"""scripts/profile_cost_model.py runs end to end on a tiny model (ragged steps with decode rows beside
a chunk, decode dispatches at full batch) and writes a cost model the scheduler can load."""
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
    assert cm.base >= 0 and json.loads(out.read_text()).keys() >= {"base", "per_prefill_token", "per_decode_row"}
