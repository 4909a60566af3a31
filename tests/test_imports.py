"""The import graph of the project's own modules (every import, lazy ones too; `if TYPE_CHECKING:` blocks aside):
layered and acyclic.

    scripts (train.py, cli_demo.py, serve.py)      import any package, never another script
    trainer/  the loop, the stages                 imports model/ and utils/
    model/    the network and what loads it        imports utils/ (files, templates, the tokenizer), never trainer/
    utils/    data in and out                      imports neither trainer/ nor model/, except the metrics that
                                                   need a model (utils/metrics.py, utils/knowledge.py and the
                                                   eval command, utils/eval_cli.py)
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "trainer", "utils")
SCRIPTS = ("train", "cli_demo", "serve")
MAY_IMPORT_MODEL = {"utils.metrics", "utils.knowledge", "utils.eval_cli"}  # a metric needs the model


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_modules() -> dict[str, Path]:
    found = {name: REPO / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules that `name` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = own_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_parser_sees_relative_lazy_and_type_checking_imports(tmp_path):
    """The checks below can fail: relative and function-level imports count, TYPE_CHECKING-only ones do not."""
    source = tmp_path / "model" / "x.py"
    source.parent.mkdir()
    source.write_text("from typing import TYPE_CHECKING\nfrom .config import ModelConfig\n"
                      "if TYPE_CHECKING:\n    from trainer.loop import Trainer\n"
                      "def f():\n    from utils.io import write_json\n    import trainer.data\n")
    known = {"model.config", "trainer.loop", "trainer.data", "utils.io", "utils", "model", "trainer"}
    assert imports_of("model.x", source, known) == {"model.config", "utils.io", "trainer.data"}


def test_layers():
    wrong = []
    for name, imported in graph().items():
        for target in imported:
            layer, other = top(name), top(target)
            if layer in SCRIPTS and other in SCRIPTS:
                wrong.append(f"{name} imports the script {target}")
            elif layer == "model" and other in ("trainer", *SCRIPTS):
                wrong.append(f"{name} imports {target}: the network knows nothing of training or the entry points")
            elif layer == "trainer" and other in SCRIPTS:
                wrong.append(f"{name} imports the script {target}")
            elif layer == "utils" and (other in ("trainer", *SCRIPTS) or (other == "model"
                                                                          and name not in MAY_IMPORT_MODEL)):
                wrong.append(f"{name} imports {target}: utils/ is data in and out")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_cycles():
    edges = {name: {t for t in targets if t != top(t) or t in SCRIPTS} for name, targets in graph().items()}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports that are neither the project's nor the standard library's."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - set(PACKAGES) - set(SCRIPTS) - {"__future__"}


# imported directly, installed by a requirement: fastapi's own parts, and Triton with torch's GPU builds (the kernels
# that use it run on CUDA only)
COMES_WITH = {"starlette": "fastapi", "pydantic": "fastapi", "triton": "torch"}


def test_the_core_imports_only_its_runtime_requirements():
    """requirements.txt names every distribution the core imports: the parity references (transformers, peft, trl,
    datasketch, ...) stay test-only, in requirements-dev.txt."""
    required = {re.split(r"[<>=!~ ;\[]", line.strip())[0].lower().replace("_", "-")
                for line in (REPO / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    providers = importlib.metadata.packages_distributions()
    missing = []
    for path in own_modules().values():
        for name in third_party_imports(path):
            dists = {d.lower().replace("_", "-") for d in providers.get(name, [name])} | {COMES_WITH.get(name, name)}
            if not dists & required:
                missing.append(f"{path.relative_to(REPO)} imports {name} ({', '.join(sorted(dists))})")
    assert not missing, "\n".join(sorted(missing))
