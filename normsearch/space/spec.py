"""What a model's normalization looks like once chosen: per-layer ``NormSpec`` and ``ModelSpec``.

A ``NormSpec`` is one slot's choice (kind + its keyword arguments + whether the standardization
loss taps the slot's output); a ``ModelSpec`` maps ``named_modules()`` labels to ``NormSpec`` and
carries the global standardization-loss weight. Both are frozen, hashable, picklable and round
trip through plain dicts (YAML/JSON).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from normsearch.norms import create_norm_layer, get_norm_entry

#: Short names of layer hyper-parameters in cell texts (K modes/components, G groups).
PARAM_SHORT = {"num_components": "K", "num_groups": "G"}


def kind_short(kind: str) -> str:
    """The registered short name of a normalizer (``"modenorm"`` -> ``"MN"``, its ``register_norm``
    ``short``); a kind no longer registered (an old study's) is returned unchanged."""
    try:
        return get_norm_entry(kind).short
    except KeyError:
        return kind


@dataclass(frozen=True)
class NormSpec:
    """One normalization slot's choice.

    Attributes:
        kind: registry name of the normalizer (``normsearch.norms.list_norms()``).
        params: keyword arguments for the layer, as sorted ``(name, value)`` pairs.
        std_loss: whether the standardization loss (Collins et al., Eq. 2) is applied to this
            slot's output (the pre-activation that feeds the non-linearity).
    """

    kind: str
    params: tuple[tuple[str, Any], ...] = ()
    std_loss: bool = False

    @classmethod
    def make(cls, kind: str, std_loss: bool = False, **params: Any) -> "NormSpec":
        return cls(kind, tuple(sorted(params.items())), std_loss)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def build(self, num_features: int) -> nn.Module:
        """Instantiate the layer for ``num_features`` channels (see ``create_norm_layer``)."""
        return create_norm_layer(self.kind, num_features, **self.kwargs)

    def describe(self) -> str:
        """Short human-readable form, e.g. ``modenorm(num_components=2)+SL``."""
        args = ", ".join(f"{k}={v}" for k, v in self.params)
        text = f"{self.kind}({args})" if args else self.kind
        return text + ("+SL" if self.std_loss else "")

    def short(self) -> str:
        """Compact form used in tables and figures, e.g. ``MN K=2+SL``."""
        parts = [kind_short(self.kind)] + [f"{PARAM_SHORT.get(k, k)}={v}" for k, v in self.params]
        return " ".join(parts) + ("+SL" if self.std_loss else "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, **self.kwargs}
        if self.std_loss:
            d["std_loss"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str) -> "NormSpec":
        if isinstance(d, str):
            return cls(d)
        d = dict(d)
        kind = d.pop("kind")
        std_loss = bool(d.pop("std_loss", False))
        return cls.make(kind, std_loss=std_loss, **d)


@dataclass(frozen=True)
class ModelSpec:
    """A whole model's normalization: label -> ``NormSpec`` plus the standardization-loss weight.

    Attributes:
        layers: mapping from ``named_modules()`` label (``"layer1.0.bn1"``) to its choice; labels
            not listed keep the model's default normalizer.
        std_loss_weight: weight of the summed standardization loss added to the task loss in
            training (0 disables it even where slots have ``std_loss=True``).
    """

    layers: Mapping[str, NormSpec] = field(default_factory=dict)
    std_loss_weight: float = 0.0

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.layers.items())), self.std_loss_weight))

    @property
    def std_loss_layers(self) -> list[str]:
        """Labels whose output the standardization loss taps (empty if the weight is 0)."""
        if self.std_loss_weight <= 0:
            return []
        return [label for label, s in self.layers.items() if s.std_loss]

    def to_dict(self) -> dict[str, Any]:
        return {
            "std_loss_weight": self.std_loss_weight,
            "layers": {label: s.to_dict() for label, s in self.layers.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        layers = {label: NormSpec.from_dict(s) for label, s in dict(d.get("layers", {})).items()}
        return cls(layers, float(d.get("std_loss_weight", 0.0)))
