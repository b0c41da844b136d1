"""A git revision of this repository checked out beside the working tree, for benchmarks
that measure today's code and a baseline side by side in one run."""
import contextlib
import os
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def worktree(rev: str):
    """Yield the path of a temporary detached worktree at ``rev``; removed on exit. Run code
    from it with ``PYTHONPATH=<path>`` (its ``ferry/`` then shadows the installed one)."""
    wt = tempfile.mkdtemp(prefix="ferry-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", wt, rev], check=True, capture_output=True)
    try:
        yield wt
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", wt], capture_output=True)


def alternate(rev: str, rounds: int):
    """Yield ("baseline", path at ``rev``) and ("now", this tree) in turn, ``rounds`` times, inside
    one worktree: the VM's speed drifts within an hour, so two revisions are compared only when
    timed alternately in the same run."""
    with worktree(rev) as wt:
        for _ in range(rounds):
            yield "baseline", wt
            yield "now", ROOT
