"""YAML as recipes are read: PyYAML's safe loader, strict where it is silent or fragile.

Refused with one line naming the place: a key given twice in one mapping (PyYAML keeps the last one silently),
nesting deeper than ``MAX_DEPTH`` levels (PyYAML recurses once per level, so deep nesting ends in a
``RecursionError``), and aliases that expand to more than ``MAX_VALUES`` values or into themselves (a few lines of
anchors can stand for billions of values: the "billion laughs" alias bomb). Anchors and aliases as such, and
``<<`` merge keys, stay allowed. Syntax errors are PyYAML's ``yaml.YAMLError``, for the caller to word.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from mft_bench.errors import MftBenchError

MAX_DEPTH = 64  # a recipe is about 4 levels deep
MAX_VALUES = 100_000  # a recipe holds a few hundred values
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise MftBenchError(f"{self.source}: YAML nested deeper than {MAX_DEPTH} levels at line "
                                    f"{mark.line + 1}, column {mark.column + 1}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == _MERGE_TAG:
                continue  # merged keys may be overridden; that is what a merge is for
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise MftBenchError(f"{self.source}: key {key!r} twice in one mapping (lines {first_line[key]} and "
                                    f"{line}); keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: Node, source: str) -> None:
    """Refuse a node graph whose aliases expand beyond ``MAX_VALUES`` values or ``MAX_DEPTH`` levels, or into a
    cycle. Each distinct node is measured once (sizes add up bottom-up), so a bomb is refused in linear time."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, measured_children = stack.pop()
        key = id(node)
        if measured_children:
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            open_nodes.discard(key)
            if size[key] > MAX_VALUES:
                raise MftBenchError(f"{source}: aliases expand to more than {MAX_VALUES} values (line "
                                    f"{node.start_mark.line + 1}); write the values out instead of nesting aliases")
            if depth[key] > MAX_DEPTH:
                raise MftBenchError(f"{source}: aliases expand to YAML nested deeper than {MAX_DEPTH} levels (line "
                                    f"{node.start_mark.line + 1})")
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise MftBenchError(f"{source}: an alias at line {node.start_mark.line + 1} refers to a value that "
                                "contains it")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)


def load(text: str, source: str) -> Any:
    """The value of one YAML document, or ``MftBenchError`` naming ``source`` for what this module refuses."""
    loader = _StrictLoader(text, source)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def decode(data: bytes, source: str) -> str:
    """``data`` as UTF-8 text (a byte-order mark dropped), or ``MftBenchError`` naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MftBenchError(f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                            "save it as UTF-8") from None
