"""YAML that cannot take the machine: files are size-checked before parsing, documents are counted
before they are built.

Configs and sweep files are a few kilobytes, so the limits are generous for them and small for an
attack. A few hundred bytes of nested aliases (the "billion laughs": ``a: &a [x, x]``, ``b: &b [*a, *a]``,
...) expand to 2^n values; PyYAML shares the aliased objects, so loading is cheap, but everything
that walks the result (pydantic, ``json.dumps``, MLflow's param logging) visits every expanded
value. ``check_node`` counts the expanded document on the composed node graph, whose size is the
file's, memoising shared nodes, and refuses it before anything is built. Loading stays
``yaml.SafeLoader``: no Python objects, only plain data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a hundred times the largest sweep file shipped
MAX_NODES = 200_000  # expanded scalars, sequences and mappings, aliases counted at every use


class YamlLimitError(ValueError):
    """A YAML document is too big or too deeply aliased; the message names it and the limit."""


def read_limited(path: str | Path, limit: int = MAX_FILE_BYTES) -> str:
    """The text of ``path``, after checking its size (a 50 MB file is refused before it is read)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise YamlLimitError(f"{path} is {size:,} bytes, above the limit of {limit:,} for a YAML file; "
                             "is it the right file?")
    return path.read_text()


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def expanded_size(root: yaml.Node, limit: int = MAX_NODES) -> int:
    """How many nodes the document holds once every alias is expanded; YamlLimitError as soon as it
    passes ``limit`` or an alias contains itself. Iterative (no recursion limit), linear in the number
    of distinct nodes: a shared node's size is computed once."""
    sizes: dict[int, int] = {}
    started: set[int] = set()  # begun and not finished: exactly the ancestors of the node being visited
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            started.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _children(node))
            if sizes[key] > limit:
                raise YamlLimitError(f"the document expands to more than {limit:,} values (nested aliases, a "
                                     f"'billion laughs'?), from line {node.start_mark.line + 1}")
            continue
        if key in sizes:
            continue
        if key in started:
            raise YamlLimitError(f"an alias on line {node.start_mark.line + 1} contains itself")
        started.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)
    return sizes[id(root)]


def compose(loader: yaml.SafeLoader) -> yaml.Node | None:
    """The loader's single document as a node graph, counted (``expanded_size``) before it is built."""
    try:
        node = loader.get_single_node()
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise YamlLimitError("the document is nested too deeply") from None
    if node is not None:
        expanded_size(node)
    return node


def safe_load(text: str) -> Any:
    """``yaml.safe_load`` with the limits above; YAMLError for bad syntax, YamlLimitError for a bomb."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlLimitError(f"the YAML text is {len(text):,} characters, above the limit of {MAX_FILE_BYTES:,}")
    loader = yaml.SafeLoader(text)
    try:
        node = compose(loader)
        return loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
