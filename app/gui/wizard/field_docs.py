"""Tooltips from the docstrings under each config dataclass field, so the GUI and the code say the same thing.

Python keeps no attribute docstrings at run time, so they are read from the module's source with `ast`. Without
source (a build that ships only bytecode) the tooltips are simply empty.
"""

from __future__ import annotations

import ast
import html
import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _module_classes(source_file: str) -> dict[str, ast.ClassDef]:
    """Every class in a module, parsed once: inspect.getsource per class would re-read and re-scan the file."""
    with open(source_file, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    try:
        source_file = inspect.getsourcefile(cls)
        node = _module_classes(source_file)[cls.__name__] if source_file else None
    except (OSError, TypeError, KeyError, SyntaxError):
        node = None
    if node is None:
        return {}
    docs = {}
    for statement, following in zip(node.body, node.body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def tooltip(cls: type, field: str) -> str:
    """The field's docstring wrapped as rich text, so Qt word-wraps it instead of drawing one very wide line."""
    text = field_docs(cls).get(field, "")
    return f"<p>{html.escape(text)}</p>" if text else ""
