"""The one place ckptcore reaches into torch's internals: its zip writer.

torch offers no public call that says which serialization id (``.data/serialization_id``) its
writer gives an archive; the id's first half depends only on the archive's record names, and
``zipwriter`` reproduces torch's archives byte for byte only with it. Those values are tabulated
(``torch_record_name_hashes.txt``); beyond the table, and to check the table, torch's own writer
(``torch._C.PyTorchFileWriter``) is asked here. ``tests/core/test_torch_writer.py`` holds this
module to what the public ``torch.save`` writes, so a torch release that changes the writer
fails that test by name instead of producing archives that differ silently.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

ID_RECORD = ".data/serialization_id"


def torch_file_writer(target: Any, align: int) -> Any:
    """torch's zip writer over a path or a binary buffer, records aligned to ``align``."""
    import torch

    writer = getattr(torch._C, "PyTorchFileWriter", None)
    if writer is None:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch._C.PyTorchFileWriter: "
            "ckptcore.formats.torch_writer needs updating for this release"
        )
    return writer(target, True, align)


def record_name_hash(names: list[str], align: int) -> str:
    """The first half of the serialization id torch's writer gives an archive of these records."""
    buf = io.BytesIO()
    w = torch_file_writer(buf, align)
    for name in names:
        w.write_record(name, b"x", 1)
    w.write_end_of_file()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        (name,) = [n for n in z.namelist() if n.endswith(ID_RECORD)]
        return z.read(name).decode()[:20]
