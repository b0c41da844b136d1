"""The installed layout: one ``ferry`` namespace, no shadowing, imports pointing one way."""
import ast
import os
import pathlib
import subprocess
import sys
import zipfile


ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "models", "kernels", "scheduler")


def test_hf_kernels_and_ferry_kernels_are_each_their_own_module(tmp_path):
    """Run from the repository root (where ``python -m pytest`` runs) with another distribution's
    regular package named ``kernels`` on the path, as transformers' dependency is."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    code = ("import kernels, ferry.kernels.compaction as c, ferry.kernels as fk\n"
            "print(kernels.__file__); print(c.__file__); print(kernels.CUDAProperties)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    hub, ours, prop = r.stdout.split()
    assert pathlib.Path(hub).parent == fake
    assert pathlib.Path(ours).resolve() == ROOT / "kernels" / "compaction.py"
    assert prop == "hub"


def test_root_folders_are_not_regular_packages():
    """The cause of the shadowing: a root folder with an ``__init__.py`` is a top-level package."""
    for pkg in PACKAGES:
        assert not (ROOT / pkg / "__init__.py").exists(), f"{pkg}/__init__.py would shadow PyPI's {pkg!r}"
        link = ROOT / "ferry" / pkg
        assert link.is_symlink() and link.resolve() == ROOT / pkg


def test_wheel_installs_only_the_ferry_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (whl,) = tmp_path.glob("ferry-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"ferry"}, tops
    for must in ("ferry/__init__.py", "ferry/engine/llm_engine.py", "ferry/engine/server/app.py",
                 "ferry/engine/entrypoints/cli.py", "ferry/kernels/compaction.py", "ferry/models/llama.py",
                 "ferry/scheduler/mlfq.py"):
        assert must in names, must
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert "ferry = ferry.engine.entrypoints.cli:main" in zipfile.ZipFile(whl).read(entry[0]).decode()


# ---------------------------------------------------------------- import direction
def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return "ferry." + ".".join(rel.parts).removesuffix(".__init__")


def _imports(path: pathlib.Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    mods = {_module_name(p): p for p in files}
    return {m: {i for i in _imports(p, top_level_only) if i in mods and i != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_cycle_finder_positive_control():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(_graph(top_level_only=False)) is None


def _layer(mod: str) -> str:
    parts = mod.split(".")
    if mod.startswith("ferry.engine.entrypoints.cli"):
        return "cli"
    if parts[1] == "engine" and len(parts) > 2 and parts[2] in ("entrypoints", "server"):
        return parts[2]
    return parts[1]


# what each layer may import from ferry: the CLI -> server -> front doors (API, async engine)
# -> engine core -> scheduler, models, kernels
ALLOWED = {
    "cli": {"cli", "server", "entrypoints", "engine", "scheduler", "models", "kernels"},
    "server": {"server", "entrypoints", "engine", "scheduler", "models", "kernels"},
    "entrypoints": {"entrypoints", "engine", "scheduler", "models", "kernels"},
    "engine": {"engine", "scheduler", "models", "kernels"},
    "models": {"models", "kernels"},
    "kernels": {"kernels"},
    "scheduler": {"scheduler"},
}


def test_imports_point_one_way_and_scheduler_never_imports_jax():
    bad = []
    for path in [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]:
        mod = _module_name(path)
        for imp in _imports(path, top_level_only=False):
            if imp.startswith("ferry.") and imp.count(".") >= 1 and _layer(imp) not in ALLOWED[_layer(mod)]:
                bad.append(f"{mod} imports {imp}")
            if _layer(mod) == "scheduler" and imp.split(".")[0] in ("jax", "jaxlib", "flax"):
                bad.append(f"{mod} imports {imp}")
    assert not bad, bad
