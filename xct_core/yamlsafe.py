"""ONE YAML reader for every YAML file the project reads (params, overlays, HPO fragments,
dvc.lock, compiled pipelines): bounded BEFORE anything is constructed.

:class:`BoundedLoader` is a :class:`yaml.SafeLoader` (no Python tags) that

* refuses a document nested deeper than ``max_depth`` while it is being composed (the
  composer recurses; 10⁵ levels never reach a ``RecursionError``);
* counts alias references and, on the composed node graph, the size and depth the document
  would have once its aliases were expanded — a "billion laughs" bomb (nine levels of
  ``&a [*b, *b, …]``) is refused before a single object exists, as is a recursive alias;
* refuses duplicate mapping keys (YAML says a key is unique; PyYAML keeps the last one
  silently), naming the key and its line; ``<<`` merge keys keep their override meaning;
* refuses integers longer than :data:`MAX_INT_DIGITS` digits (a 5000-digit literal).

:func:`read_yaml_doc` adds the bounded file read of :func:`xct_core.jsondoc.read_doc_text`
(regular files only, at most ``max_bytes``, strict UTF-8). Every failure is one
:class:`~xct_core.errors.InputError` line naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from xct_core.errors import InputError
from xct_core.jsondoc import MAX_DOC_BYTES, read_doc_text

__all__ = ["MAX_ALIASES", "MAX_INT_DIGITS", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "BoundedLoader",
           "YamlLimitError", "load_yaml_text", "load_yaml_all_text", "read_yaml_doc"]

#: deepest nesting of sequences/mappings, as written and after alias expansion
MAX_YAML_DEPTH = 64
#: most nodes a document may have once its aliases are expanded
MAX_YAML_NODES = 1_000_000
#: most alias references (``*name``) in one document
MAX_ALIASES = 10_000
#: longest integer literal (digits)
MAX_INT_DIGITS = 100

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLimitError(yaml.YAMLError):
    """A document beyond a :class:`BoundedLoader` bound (or with a duplicate key)."""


def _line(node_or_mark: Any) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


class BoundedLoader(yaml.SafeLoader):
    """A SafeLoader with bounded depth, aliases, alias expansion and integers, and unique keys."""

    max_depth = MAX_YAML_DEPTH
    max_nodes = MAX_YAML_NODES
    max_aliases = MAX_ALIASES

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0

    # ---- composition: depth and alias counts while the node graph is built
    def compose_node(self, parent: Node | None, index: Any) -> Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > self.max_aliases:
                raise YamlLimitError(f"more than {self.max_aliases} aliases ({_line(self.peek_event())})")
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise YamlLimitError(f"nested deeper than {self.max_depth} levels ({_line(self.peek_event())})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Node:
        node = super().compose_document()
        _check_expansion(node, self.max_nodes, self.max_depth)
        return node

    # ---- construction: unique keys, bounded integers
    def construct_mapping(self, node: Node, deep: bool = False) -> dict:
        if isinstance(node, MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    dup = key in seen
                except TypeError:  # unhashable: the base constructor names it
                    continue
                if dup:
                    raise YamlLimitError(f"duplicate key {key!r} ({_line(key_node)}); YAML keys must be unique")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: ScalarNode) -> int:
        digits = sum(c.isalnum() for c in str(node.value))
        if digits > MAX_INT_DIGITS:
            raise YamlLimitError(f"integer with {digits} digits ({_line(node)}; at most {MAX_INT_DIGITS})")
        return super().construct_yaml_int(node)


BoundedLoader.add_constructor("tag:yaml.org,2002:int", BoundedLoader.construct_yaml_int)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [x for kv in node.value for x in kv]
    return []


def _check_expansion(root: Node | None, max_nodes: int, max_depth: int) -> None:
    """Refuse a node graph whose alias expansion exceeds ``max_nodes`` nodes or ``max_depth``
    levels, or that refers to itself. Iterative post-order over the (shared) graph: each node
    is measured once, so a bomb costs what its text costs."""
    if root is None:
        return
    done: dict[int, tuple[int, int]] = {}
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = _children(node)
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            open_.discard(key)
            done[key] = (size, depth)
            if size > max_nodes:
                raise YamlLimitError(f"aliases expand to more than {max_nodes} nodes ({_line(node)})")
            if depth > max_depth:
                raise YamlLimitError(f"aliases expand to deeper than {max_depth} levels ({_line(node)})")
            continue
        if key in done:
            continue
        if key in open_:
            raise YamlLimitError(f"recursive alias ({_line(node)})")
        open_.add(key)
        stack.append((node, True))
        for k in _children(node):
            if id(k) in open_:
                raise YamlLimitError(f"recursive alias ({_line(k)})")
            if id(k) not in done:
                stack.append((k, False))


def _problem(e: yaml.YAMLError) -> str:
    if isinstance(e, YamlLimitError):
        return f"refused YAML: {e}"
    if isinstance(e, yaml.MarkedYAMLError) and (e.problem or e.context):
        what = " ".join(str(e.problem or e.context).split())
        mark = e.problem_mark or e.context_mark
        return f"not valid YAML ({what}{f', {_line(mark)}' if mark is not None else ''})"
    return f"not valid YAML ({' '.join(str(e).splitlines()[0].split()) if str(e) else type(e).__name__})"


def load_yaml_text(text: str, source: str | Path) -> Any:
    """One YAML document from ``text`` (``None`` when empty) with every bound applied; a
    one-line :class:`InputError` naming ``source`` otherwise."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise InputError(source, _problem(e)) from None
    except (ValueError, RecursionError, OverflowError) as e:  # a constructor's own refusal
        raise InputError(source, f"not valid YAML ({' '.join(str(e).split()) or type(e).__name__})") from None
    finally:
        loader.dispose()


def load_yaml_all_text(text: str, source: str | Path) -> list[Any]:
    """Every document of a multi-document YAML stream (``---``), bounded per document."""
    loader = BoundedLoader(text)
    try:
        docs = []
        while loader.check_data():
            docs.append(loader.get_data())
        return docs
    except yaml.YAMLError as e:
        raise InputError(source, _problem(e)) from None
    except (ValueError, RecursionError, OverflowError) as e:
        raise InputError(source, f"not valid YAML ({' '.join(str(e).split()) or type(e).__name__})") from None
    finally:
        loader.dispose()


def read_yaml_doc(path: str | Path, what: str = "YAML file", *, missing_hint: str | None = None,
                  max_bytes: int = MAX_DOC_BYTES) -> Any:
    """The YAML document in ``path`` (``None`` when empty): bounded read, bounded parse."""
    p = Path(path)
    return load_yaml_text(read_doc_text(p, what, missing_hint=missing_hint, max_bytes=max_bytes), p)
