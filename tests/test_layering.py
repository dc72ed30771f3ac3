"""The layering of docs/architecture.md, enforced on the transitive import graph.

Every import of every module counts, at the top of a file or inside a function (a lazy import is
still a dependency), except the few lazy edges the document names. A second check runs real
entry points in a fresh interpreter and looks at what they loaded.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vitkit"
PARTS = ("preprocess", "models", "run", "card", "convert", "data", "engine", "explain", "export", "serve", "benchmark",
         "cli")
# What each part may import (besides itself), transitively. Mirrors docs/architecture.md.
ALLOWED = {
    "preprocess": set(),
    "models": {"preprocess"},
    "run": {"models", "preprocess"},
    "card": {"models", "run", "preprocess"},
    "convert": {"models", "run", "card", "preprocess"},
    "data": {"preprocess"},
    "explain": {"models", "run", "card", "preprocess", "convert"},
    "export": {"models", "run", "card", "preprocess", "convert", "data"},
    "serve": {"models", "run", "card", "preprocess", "convert", "data", "explain", "export"},
    "engine": {"models", "run", "card", "preprocess", "convert", "data"},
    "benchmark": {"models", "run", "card", "preprocess", "convert", "data", "engine"},
    "cli": set(PARTS),
}
# Lazy imports that go up on purpose: `create_model(pretrained=...)` and `load_weights` reach the
# converters only when called, so `vitkit.models` itself never loads them.
LAZY_UP = {("vitkit.models.weights", "vitkit.convert"), ("vitkit.models.registry", "vitkit.convert")}


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """vitkit modules `path` imports anywhere, with every package on the way (importing a.b.c runs a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            parts = t.split(".")
            found |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path, name) if not any(m == b or m.startswith(b + ".") for a, b in LAZY_UP if a == name)}
    return graph


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in PARTS else None


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_every_part_reaches_only_what_the_architecture_allows():
    graph, bad = _graph(), []
    for module in sorted(graph):
        part = _part(module)
        if part is None:
            continue
        for dep in sorted(_reach(graph, module)):
            dep_part = _part(dep)
            if dep_part is not None and dep_part != part and dep_part not in ALLOWED[part]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad[:40])


def test_the_graph_sees_the_lazy_imports_too():
    """The checker must fail on a violation hidden inside a function: evaluate_run is engine code."""
    graph = _graph()
    assert "vitkit.data" in _reach(graph, "vitkit.engine.evaluate")
    assert "vitkit.convert" not in _reach(graph, "vitkit.models")  # only through the named lazy edges
    assert "vitkit.explain" in graph["vitkit.serve.predictor"]  # imported inside a method


def test_the_document_names_every_part():
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    assert all(f"`{p}`" in doc for p in PARTS if p != "cli") and "`cli`" in doc


_PROBE = """
import json, sys
{setup}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("vitkit"))))
"""


def _loaded(setup: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(setup=setup)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    import vitkit
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("w") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vitkit.create_model("vit_pico_patch4_28").state_dict().items()}, path)
    return path


def _training_code(loaded: set[str]) -> set[str]:
    return {m for m in loaded if m.startswith(("vitkit.engine", "vitkit.data"))}


def test_create_model_with_pretrained_weights_loads_no_engine_or_data(weights_file):
    loaded = _loaded(f"import vitkit.models as m; m.create_model('vit_pico_patch4_28', pretrained={str(weights_file)!r})")
    assert "vitkit.convert" in loaded and not _training_code(loaded)


def test_tools_that_run_a_model_load_no_training_code(tmp_path, weights_file):
    run = tmp_path / "run"
    assert subprocess.run([sys.executable, "-m", "vitkit", "convert", str(weights_file), str(run), "--model",
                           "vit_pico_patch4_28"], capture_output=True, timeout=120).returncode == 0
    loaded = _loaded(f"""
import vitkit.convert, vitkit.explain, vitkit.export, vitkit.serve, vitkit.run
run = vitkit.run.load_run({str(run)!r})
vitkit.explain.rollout(run.model, run.preprocess([__import__('PIL.Image').Image.new('L', (28, 28))]))
""")
    assert {"vitkit.convert", "vitkit.explain", "vitkit.export", "vitkit.serve"} <= loaded
    assert not {m for m in loaded if m.startswith("vitkit.engine")}
