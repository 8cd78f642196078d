"""ckptcore: load, convert, import and repartition NeMo Megatron checkpoints on one CPU process.

A plain library (no Prefect): formats, partition rule tables, the plan and streaming engine, the
reference ViT model, lineage records. ``VitClassificationModel`` and ``CkptError`` are exported
here; the operations live in :mod:`ckptcore.api`.
"""

from __future__ import annotations

from typing import Any

from ckptcore.errors import CkptError

__version__ = "0.2.0"
__all__ = ["CkptError", "VitClassificationModel", "__version__"]


def __getattr__(name: str) -> Any:  # imported on first use: torch is heavy
    if name == "VitClassificationModel":
        from ckptcore.model.vit import VitClassificationModel

        return VitClassificationModel
    raise AttributeError(name)
