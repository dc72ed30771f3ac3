"""models imports nothing from data, engine or the CLI (one-way layering)."""

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "src" / "vitkit" / "models"


def test_models_do_not_import_upper_layers():
    bad = []
    for f in MODELS.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                if any(part in mod.split(".") for part in ("data", "engine", "cli", "explain", "export")):
                    bad.append(f"{f.name}: {mod}")
            elif isinstance(node, ast.Import):
                bad += [f"{f.name}: {a.name}" for a in node.names if a.name.startswith("vitkit.") and not a.name.startswith("vitkit.models")]
    assert not bad, bad
