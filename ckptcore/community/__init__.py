"""Community ViT checkpoints (transformers ``ViTForImageClassification``, timm ``VisionTransformer``)
to ``.nemo`` and back.

- :func:`import_hf` (``api.py``): a Hub-style folder -> ``.nemo`` at any TP/PP, through the same
  plan and engine as :func:`ckptcore.api.convert`.
- :func:`export_hf` (``api.py``): any ``.nemo`` ViT classifier -> a folder that
  ``ViTForImageClassification.from_pretrained`` loads.
- ``mapping.py``: the key table and named transforms (used both ways); ``hf.py``: Hub folders,
  weight files and the transformers format; ``timm.py``: the timm format.
"""

from ckptcore.community.api import detect_kind, export_hf, import_hf, open_community

__all__ = ["detect_kind", "export_hf", "import_hf", "open_community"]
