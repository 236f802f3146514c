"""Strict YAML reading shared by the configuration file, ``kdsctl apply`` and ``kds-dp``.

PyYAML follows YAML 1.1, where ``yes``, ``no``, ``on`` and ``off`` are booleans and
``2024-01-01`` is a date: ``name: no`` would become ``False``, and a date cannot be
sent as JSON. These loaders read YAML 1.2's booleans only (``true``/``false``), keep
timestamps as text where asked, and refuse a key given twice instead of silently
keeping the last one.
"""

from __future__ import annotations

import re
from typing import Any, Final

import yaml

__all__ = ["DocumentLoader", "StrictLoader"]

_BOOL: Final = "tag:yaml.org,2002:bool"
_TIMESTAMP: Final = "tag:yaml.org,2002:timestamp"


class StrictLoader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 booleans and no duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class DocumentLoader(StrictLoader):
    """:class:`StrictLoader` that also keeps timestamps as text: resources as JSON sees them."""


def _resolve(loader: type[yaml.SafeLoader], dropped: frozenset[str]) -> None:
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in dropped]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )


_resolve(StrictLoader, frozenset({_BOOL}))
_resolve(DocumentLoader, frozenset({_BOOL, _TIMESTAMP}))
