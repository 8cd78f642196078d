"""Partition rules as data: a table per model family, one row per parameter-name pattern.

A row says how a tensor is split across tensor-parallel ranks and which pipeline stage owns it.
The engine reads only these tables; it never knows a model family by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ckptcore.errors import CkptError


class Stage(Enum):
    FIRST = "first"  # embeddings: the first pipeline stage
    LAST = "last"  # final norm and head: the last pipeline stage
    LAYER = "layer"  # a transformer layer's tensors: the stage that holds that layer


@dataclass(frozen=True)
class Rule:
    """One row: keys matching ``pattern`` (a regex, ``{L}`` for the layer prefix) get this treatment.

    ``split_dim`` None means replicated on every TP rank. ``groups`` > 1 means the full tensor is
    ``groups`` equal blocks along ``split_dim`` and each rank takes its chunk of every block
    (Megatron's strided split, e.g. legacy ``[Q; K; V]``); ``groups_when`` names a config flag
    that must be true for the grouping to apply.
    """

    pattern: str
    stage: Stage
    split_dim: int | None = None
    groups: int = 1
    groups_when: str | None = None
    note: str = ""

    def groups_for(self, config: Mapping[str, Any]) -> int:
        if self.groups_when is None or config.get(self.groups_when):
            return self.groups
        return 1


@dataclass(frozen=True)
class Family:
    """A model family: its rule table, how layer keys are numbered, and its config checks."""

    name: str
    targets: tuple[str, ...]  # config `target` class paths this family handles
    layer_prefix: (
        str  # regex of what precedes a layer number, e.g. r"model\.backbone\.transformer\.layers\."
    )
    rules: tuple[Rule, ...]
    num_layers_key: str = "num_layers"
    expected_shapes: Callable[[Mapping[str, Any]], dict[str, tuple[int, ...] | None]] | None = None
    check_target: Callable[[Mapping[str, Any], int, int], None] | None = None
    # the config completed with what only the weights' key names tell (see model_config)
    weights_layout: Callable[[Mapping[str, Any], list[str]], dict[str, Any]] | None = None
    default_target: str = ""
    _compiled: list[tuple[re.Pattern, Rule]] = field(
        default_factory=list, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        for rule in self.rules:
            rx = re.compile("^" + rule.pattern.replace("{L}", self.layer_prefix + r"\d+\.") + "$")
            self._compiled.append((rx, rule))
        object.__setattr__(self, "_layer_rx", re.compile(f"^({self.layer_prefix})(\\d+)(\\..*)$"))

    def rule_for(self, key: str) -> Rule | None:
        """The one rule matching ``key``; two matches is a defect in the table."""
        found = [rule for rx, rule in self._compiled if rx.match(key)]
        if len(found) > 1:
            raise CkptError(
                None, f"rule table {self.name} matches this key {len(found)} times", key
            )
        return found[0] if found else None

    def split_layer(self, key: str) -> tuple[str, int, str] | None:
        """(prefix, layer, rest) for a per-layer key, else None."""
        m = self._layer_rx.match(key)  # type: ignore[attr-defined]
        if not m:
            return None
        return m.group(1), int(m.group(2)), m.group(3)

    def model_config(self, config: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
        """``config`` for building and checking the network: a family whose config leaves part
        of the layout unsaid reads it from the weights' ``keys``."""
        if self.weights_layout is None:
            return dict(config)
        return self.weights_layout(config, keys)

    def with_layer(self, key: str, layer: int) -> str:
        parts = self.split_layer(key)
        if parts is None:
            return key
        return f"{parts[0]}{layer}{parts[2]}"
