"""Import torchvision on a CPU-only torch whose torchvision wheel is a CUDA build.

Why this exists: on this project's machines torch is the CPU wheel (2.13.0+cpu) but the only
torchvision 0.28.0 wheel is built against CUDA torch. Its compiled extension ``torchvision._C``
then fails to load, and ``import torchvision`` dies in ``_meta_registrations`` with
"operator torchvision::nms does not exist", because that module registers fake kernels for ops
whose schemas the extension would have defined.

What it does: if, and only if, the extension cannot be loaded, it defines the two op *schemas*
(``torchvision::nms`` and ``torchvision::qnms``; no kernels) with ``torch.library`` before
torchvision is imported. Datasets and tensor transforms then work; compiled ops (nms, roi_align,
image decoding) still raise when called. Where the real extension loads (any matching
torch/torchvision pair, every GPU install) this module does nothing.

Use ``from normsearch.data._tv_compat import torchvision`` instead of ``import torchvision``.
"""

from __future__ import annotations

import importlib.util
import sys


def _extension_loads() -> bool:
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return True  # not installed: let the real import raise its own error
    import glob
    import os

    for path in spec.submodule_search_locations:
        for lib in glob.glob(os.path.join(path, "_C*.so")) + glob.glob(os.path.join(path, "_C*.pyd")):
            try:
                torch.ops.load_library(lib)
                return True
            except (OSError, RuntimeError):
                return False
    return False


def _define_missing_schemas() -> None:
    import torch

    if hasattr(torch.ops.torchvision, "nms"):  # already defined by someone
        return
    lib = torch.library.Library("torchvision", "DEF")  # noqa: F841 - kept alive below
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.modules[__name__]._schema_lib = lib  # the Library object must outlive this call


if "torchvision" not in sys.modules and not _extension_loads():
    _define_missing_schemas()

import torchvision  # noqa: E402

__all__ = ["torchvision"]
