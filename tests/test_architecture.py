"""The layering rules of docs/architecture.md, checked on the source: no import cycle, and who may
import whom. A change that makes the training loop import a defense, or a defense the config schema,
fails here."""

import ast
from pathlib import Path

import pytest

import nasty

ROOT = Path(nasty.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        name = ".".join(("nasty", *p.relative_to(ROOT).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = p
    return out


MODULES = _modules()


def _targets(name: str, path: Path, node: ast.AST) -> list[str]:
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        return subs if subs and len(subs) == len(node.names) else [base, *subs]  # "from . import sub": the submodule
    return [a.name for a in node.names]


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """Package-internal imports of every module: at module level (run when the module is imported;
    ``if TYPE_CHECKING`` blocks excluded), or anywhere in it."""
    out: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if top_level_only:
            nodes = []
            for node in tree.body:
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                    continue
                nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))] \
                    if isinstance(node, (ast.If, ast.Try)) else [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        else:
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        out[name] = {t for n in nodes for t in _targets(name, path, n) if t in MODULES and t != name}
    return out


@pytest.mark.parametrize("top_level_only", [True, False], ids=["module-level", "any-import"])
def test_no_import_cycle(top_level_only):
    """No import cycle at all: neither among the imports that run when a module is imported, nor once
    the imports inside functions and ``if TYPE_CHECKING`` blocks are counted (a function-level import
    only hides a cycle). Seen failing on analyse <-> plan (``AuditSettings``) before settings.py."""
    graph = _imports(top_level_only=top_level_only)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _under(module: str, *areas: str) -> bool:
    return any(module == f"nasty.{a}" or module.startswith(f"nasty.{a}.") for a in areas)


RULES = [  # (who, may not import, why)
    (("defenses",), ("pipelines", "config", "cli", "audit"), "a defense declares its parameters; the schema asks it"),
    (("train", "frozen", "resume"), ("defenses", "attacks", "audit", "pipelines", "config", "cli"),
     "the training loop knows objectives, not defenses or attacks"),
    (("models",), ("train", "frozen", "resume", "data", "defenses", "attacks", "audit", "pipelines", "config", "checkpoint"),
     "models know nothing of training"),
    (("data",), ("models", "train", "defenses", "attacks", "audit", "pipelines", "config"), "data knows nothing of models"),
    (("attacks",), ("audit", "defenses", "pipelines", "config", "cli"), "attacks know neither the audit nor the defenses' code"),
    (("audit.render", "audit.analyse", "audit.stats", "audit.schema"), ("audit.run", "audit.execute", "cli"),
     "the report and the analysis do not import the runner"),
    (("pipelines", "audit", "config", "runs", "checkpoint", "export"), ("cli",), "only the CLI parses options and prints"),
    (("escape",), ("models", "train", "data", "defenses", "attacks", "audit", "pipelines", "config", "checkpoint", "cli", "runs"),
     "the escaping functions are a leaf every sink may import"),
]


@pytest.mark.parametrize("who,banned,why", RULES, ids=[r[2] for r in RULES])
def test_layering(who, banned, why):
    bad = sorted(f"{m} imports {t}" for m, ts in _imports(top_level_only=False).items() if _under(m, *who)
                 for t in ts if _under(t, *banned))
    assert not bad, f"{why}: {bad}"
