"""The README's "Where things are" and docs/ARCHITECTURE.md name real files and symbols.

Read without importing anything: each `path.py:Symbol` (or a table cell
"`path.py`: `Symbol`, `Other`") is looked up in the file's syntax tree, so a
renamed function or a moved file fails here instead of misleading a reader.
"""

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = r"(?:research|launch|benchmarks|tests|docs)/[\w/.-]*"
# `path.py:Symbol.attr` or `path/`
INLINE = re.compile(rf"`({PATH})(?::([\w.]+))?`")
# `path.py`: `Symbol`, `Symbol2`
CELL = re.compile(rf"`({PATH}\.py)`: ((?:`[\w.]+`(?:, )?)+)")


def _defined(tree: ast.Module, dotted: str) -> bool:
    scope: list = tree.body
    for part in dotted.split("."):
        found = None
        for node in scope:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == part:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def references(text: str) -> list[tuple[str, str | None]]:
    refs = [(m.group(1), m.group(2)) for m in INLINE.finditer(text)]
    for m in CELL.finditer(text):
        refs += [(m.group(1), sym) for sym in re.findall(r"`([\w.]+)`", m.group(2))]
    return refs


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end > 0 else None]


DOCS = {
    "README.md: Where things are": lambda: _section(open(os.path.join(ROOT, "README.md")).read(),
                                                    "## Where things are"),
    "docs/ARCHITECTURE.md": lambda: open(os.path.join(ROOT, "docs", "ARCHITECTURE.md")).read(),
}


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_every_named_file_and_symbol_exists(doc):
    refs = references(DOCS[doc]())
    assert len(refs) > 20, f"{doc}: expected a map of the code, found {len(refs)} references"
    missing = []
    for path, symbol in refs:
        full = os.path.join(ROOT, path)
        if not os.path.exists(full):
            missing.append(path)
        elif symbol:
            with open(full) as f:
                if not _defined(ast.parse(f.read()), symbol):
                    missing.append(f"{path}:{symbol}")
    assert not missing, f"{doc} names what does not exist: {missing}"


def test_the_checker_catches_a_wrong_name():
    text = "`research/run/loop.py`: `Trainer._replica_step`, `Trainer.no_such_method` and `research/nowhere.py`"
    refs = references(text)
    assert ("research/run/loop.py", "Trainer.no_such_method") in refs and ("research/nowhere.py", None) in refs
    with open(os.path.join(ROOT, "research/run/loop.py")) as f:
        tree = ast.parse(f.read())
    assert _defined(tree, "Trainer._replica_step") and not _defined(tree, "Trainer.no_such_method")
