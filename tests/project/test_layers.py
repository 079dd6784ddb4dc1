"""The package's imports point down the layers the README's Layout section lists, and form no cycle."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import thinkforge

PACKAGE = Path(thinkforge.__file__).parent

# Bottom to top, as in the README. A module may import its own layer or any layer below it.
LAYERS = [
    ["errors", "keys", "objectives", "progress", "rollout.settings"],
    ["config", "console", "csv_log", "run_record"],
    ["data", "rewards", "sandbox", "tokenizer", "chat", "benchmarks"],
    ["losses", "stage_configs", "preflight"],
    ["adapters", "backbone", "pretrained", "collectives", "optim"],
    ["rollout", "metrics"],
    ["stages", "resume", "preemption", "loggers"],
    ["curves", "sweeps", "training"],
    ["eval", "doctor", "pipeline", "data_cli", "cli", "api"],
]
LAYER_OF = {name: level for level, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """A module's layer: its own entry, else its folder's."""
    return LAYER_OF.get(module, LAYER_OF.get(module.split(".")[0]))


def imports(path: Path) -> set[str]:
    """thinkforge modules this file imports, wherever in the file (a function-level import counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("thinkforge"):
            base = node.module.removeprefix("thinkforge").lstrip(".")
            for alias in node.names:
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if (PACKAGE / candidate.replace(".", "/")).with_suffix(".py").exists() else base)
        elif isinstance(node, ast.Import):
            found |= {
                alias.name.removeprefix("thinkforge.") for alias in node.names if alias.name.startswith("thinkforge.")
            }
    return {name for name in found if name}


GRAPH = {module_name(path): imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert [module for module in GRAPH if module and layer(module) is None] == []


def test_imports_point_down():
    upward = [
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in GRAPH.items()
        if module
        for target in targets
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycle():
    try:
        TopologicalSorter({module: targets - {module} for module, targets in GRAPH.items()}).prepare()
    except CycleError as error:
        raise AssertionError(f"import cycle: {' -> '.join(error.args[1])}") from None


def test_the_backbone_imports_no_loss_and_no_dataset():
    assert not {
        target for target in GRAPH["backbone"] if target.startswith(("losses", "data.synthetic", "data.records"))
    }


def test_the_command_line_composes_configs_without_torch():
    """`thinkforge-* --help` and a dry run's config composition must not pay torch's import (about a second)."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, thinkforge.cli; print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'lightning', 'sympy'}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "[]"


def test_components_take_their_own_settings_not_the_run_config():
    """The engines, rewards, data layer and losses are handed their own settings; none reads the whole run."""
    components = [*PACKAGE.glob("rollout/*.py"), *PACKAGE.glob("rewards/*.py"), *PACKAGE.glob("data/*.py")]
    readers = []
    for path in [*components, PACKAGE / "losses.py"]:
        tree = ast.parse(path.read_text())
        names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        if {"TrainConfig", "run"} & names:
            readers.append(module_name(path))
    assert readers == []
