"""What a trained trial's adaptive normalizers learned: its saved model, SwitchNorm importance
weights and ModeNorm gate usage on real images. Used by ``normsearch report``; works on any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normsearch.config import StudyConfig
from normsearch.norms import ModeGroupNorm2d, ModeNorm2d
from normsearch.norms.switchable import collect_importance
from normsearch.space.spec import ModelSpec
from normsearch.space.surgery import model_from_spec

__all__ = ["collect_importance", "load_trial_model", "mode_gates", "validation_images"]


def load_trial_model(cfg: StudyConfig, path: Path, *, in_channels: int, num_classes: int) -> nn.Module:
    """Rebuild a trial's model from a weights file of ``normsearch.train.trial.save_weights`` (CPU, eval mode).

    Unlike ``normsearch.train.trial.load_weights`` this needs no data bundle, only the data's shape.

    Args:
        cfg: the run configuration (model name and kwargs).
        path: ``RUN_DIR/trials/NNNNN/model.pt``.
        in_channels: image channels the model was trained on.
        num_classes: classifier outputs.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        RuntimeError: the stored state does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = model_from_spec(cfg.model.name, ModelSpec.from_dict(payload["spec"]), in_channels=in_channels,
                            num_classes=num_classes, **cfg.model.kwargs)
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def validation_images(cfg: StudyConfig, count: int) -> torch.Tensor:
    """The first ``count`` validation images, normalized as in training: (N, C, H, W) float32.

    Raises:
        normsearch.data.DataError: the dataset is missing and cannot be downloaded.
    """
    from normsearch.data import load_data, normalize

    bundle = load_data(cfg.data)
    return normalize(bundle.val.x[:count], bundle.mean, bundle.std)


class _GateRecorder:
    """Forward hook keeping a ModeNorm2d/ModeGroupNorm2d layer's gates on its input, from the
    layer's own :meth:`~normsearch.norms.ModeNorm2d.gates` (the forward's formula, Alg. 1-3):
    (N, K) per image for ModeNorm2d; (N*C, K) per image and channel for ModeGroupNorm2d."""

    def __init__(self) -> None:
        self.gates: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        gates = module.gates(inputs[0])
        self.gates.append(gates.reshape(-1, gates.shape[-1]).float().cpu())


@torch.no_grad()
def mode_gates(model: nn.Module, images: torch.Tensor, batch_size: int = 128) -> dict[str, np.ndarray]:
    """Gate values of every ModeNorm2d/ModeGroupNorm2d of ``model`` on ``images``, in eval mode.

    The model is left in eval mode, its hooks removed.

    Args:
        model: any model (layers found by ``named_modules()``).
        images: (N, C, H, W) normalized inputs (moved to the model's device batch by batch).
        batch_size: images per forward pass.

    Returns:
        ``{label: (M, K) float array}`` in model order, each row summing to 1 (M = N for
        ModeNorm2d, N * C for ModeGroupNorm2d); empty if the model has no such layer.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (ModeNorm2d, ModeGroupNorm2d))]
    if not layers:
        return {}
    recorders = {n: _GateRecorder() for n, _ in layers}
    handles = [m.register_forward_hook(recorders[n]) for n, m in layers]
    try:
        model.eval()
        device = next(model.parameters()).device
        for start in range(0, len(images), batch_size):
            model(images[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r.gates).numpy() for n, r in recorders.items() if r.gates}
