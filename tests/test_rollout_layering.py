"""Stage boundaries of the weight-sync design: nothing under rollout/ imports training/, the transports never look
at the engine's type, and the product package ships no fake SGLang server."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "tapo_megatron"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_rollout_never_imports_training():
    bad = {f"{p.name}: {m}" for p in (PKG / "rollout").glob("*.py") for m in _imports(p)
           if m.startswith("tapo_megatron.training")}
    assert not bad, bad


def test_transports_do_not_branch_on_engine_type():
    for path in (PKG / "training" / "weight_sync").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                assert "Engine" not in ast.unparse(node), f"{path.name}: {ast.unparse(node)}"


def test_no_fake_server_in_the_package():
    assert not [p for p in PKG.rglob("*.py") if "fake" in p.name.lower()]
