"""Partition rule tables, one per model family, and the registry that picks one for a checkpoint.

A family is data (:class:`~ckptcore.rules.table.Family`: rows of key patterns with their split
and stage); adding one is adding its module and naming it in :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptcore.errors import CkptError
from ckptcore.rules.megatron_vit import VIT
from ckptcore.rules.table import Family

FAMILIES: tuple[Family, ...] = (VIT,)


def family_named(name: str) -> Family:
    """The family called ``name``."""
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise CkptError(None, f"no partition rule table named {name!r}")


def family_for(config: Mapping[str, Any], keys: list[str], path: str | None = None) -> Family:
    """Pick the family by the config's ``target``, else by which table knows the keys."""
    target = str(config.get("target") or "")
    for fam in FAMILIES:
        if target and target in fam.targets:
            return fam
    for fam in FAMILIES:
        if keys and all(fam.rule_for(k) is not None for k in keys):
            return fam
    raise CkptError(
        path,
        f"unsupported model (target {target or 'unknown'}): no partition rule table knows its keys",
    )
