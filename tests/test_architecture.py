"""The import graph flows one way (docs/architecture.md), and no command imports another command.

Each module's layer is below; a module may import only from its own layer or a lower one. The
command layer holds one family per command, and a family imports no other family.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nexttools"

LAYERS: list[tuple[str, ...]] = [
    # 0: foundations and the typed documents every layer may use
    (
        "nexttools",
        "errors",
        "console",
        "device",
        "options",
        "workdir",
        "safe_files",
        "jump_record",
        "launch",
        "disk",
        "secrets_scrub",
        "locking",
        "manifest",
        "threads",
        "ranks",
    ),
    ("checkpoints",),
    ("lowrank", "dense_rank1", "base_shifts"),
    ("store",),
    ("predictor", "run", "frobenius", "consistency", "worth", "evaluation", "verdict"),
    ("records",),
    ("methods",),
    ("outputs", "writer", "skill"),
    ("card",),
    ("hub",),
    (
        "extract",
        "extract_plan",
        "extract_sources",
        "extract_ranks",
        "fit",
        "advisor",
        "inspect_run",
        "plots",
        "extrapolate",
        "extrapolate_choice",
    ),
    ("schedule",),
    ("cli", "__main__"),
]
COMMAND_FAMILIES = [
    {"extract", "extract_plan", "extract_sources", "extract_ranks"},
    {"fit"},
    {"advisor"},
    {"inspect_run", "plots"},
    {"extrapolate", "extrapolate_choice"},
]


def _top(module: str) -> str:
    """``nexttools.store.reader`` -> ``store``; the package itself -> ``nexttools``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(module: str) -> int:
    top = _top(module)
    return next(i for i, names in enumerate(LAYERS) if top in names)


def _imports() -> dict[str, set[str]]:
    """Every nexttools module -> the nexttools modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nexttools"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("nexttools")}
        graph[module] = targets
    return graph


def test_every_module_has_a_layer() -> None:
    for module in _imports():
        _layer(module)  # StopIteration names a module that docs/architecture.md does not place


def test_imports_flow_one_way() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_command_imports_another_command() -> None:
    family = {name: index for index, names in enumerate(COMMAND_FAMILIES) for name in names}
    crossing = [
        f"{module} -> {target}"
        for module, targets in _imports().items()
        for target in targets
        if _top(module) in family and _top(target) in family and family[_top(module)] != family[_top(target)]
    ]
    assert crossing == []
