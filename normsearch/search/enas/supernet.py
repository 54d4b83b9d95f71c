"""Shared-weight supernet for ENAS over normalization layers, and running-statistics recalibration.

One copy of the configured CNN (``normsearch.models.create_model``) holds the shared convolution
and linear weights; each searched slot becomes a :class:`MixedNorm` holding one normalizer per
controller option (each with its own affine parameters, gates, importance weights and running
statistics). :meth:`Supernet.set_sample` routes every slot through its chosen normalizer, so a
forward pass is exactly the forward pass of that child (Pham et al., *Efficient Neural
Architecture Search via Parameter Sharing*, ICML 2018, Sec. 2: children share the weights of one
large graph). :func:`child_from_supernet` builds the standalone child (``model_from_spec``) and
copies the shared weights and the chosen normalizers' state into it.

Running statistics (BatchNorm's running mean/variance, ModeNorm's per-mode estimates, SwitchNorm's
BN statistics, MixtureNorm's queue) are only used in eval mode. In the supernet they have been
updated by whichever children happened to use a normalizer, against shared weights that kept
changing, so they are not the statistics of any one child ("supernet accuracy is not standalone
accuracy", a frequent NNI/one-shot NAS report). :func:`recalibrate` re-estimates them for the
active child before it is evaluated: reset, then training-mode forwards under ``no_grad`` with a
cumulative (equal-weight) average over the batches, the reading of BN statistics recalibration
used by one-shot NAS work and SwitchNorm's batch average (Luo et al., ICLR 2019, App. A).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

from torch import Tensor, nn

from normsearch.models import create_model
from normsearch.norms import recalibrate as recalibrate_norms
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.space.surgery import find_norm_slots, model_from_spec

__all__ = ["MixedNorm", "Supernet", "active_modules", "child_from_supernet", "recalibrate"]


class MixedNorm(nn.Module):
    """One normalization slot of the supernet: candidate normalizers, one of them active.

    Args:
        candidates: the normalizers (one per controller option), all for the same channel count.

    Attributes:
        active: index of the candidate the forward pass uses (a plain int, not saved in the
            ``state_dict``: the sample is chosen per batch).

    Shape:
        Input (N, C, H, W) -> output (N, C, H, W), that of ``candidates[active]``.

    Raises:
        ValueError: ``candidates`` is empty.
    """

    def __init__(self, candidates: Sequence[nn.Module]):
        super().__init__()
        if not candidates:
            raise ValueError("MixedNorm needs at least one candidate normalizer")
        self.candidates = nn.ModuleList(candidates)
        self.active = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.candidates[self.active](x)

    def extra_repr(self) -> str:
        return f"active={self.active}"


def active_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Every module a forward pass of ``model`` can reach: inside a :class:`MixedNorm` only the
    active candidate. Works on any ``nn.Module`` (a standalone model yields all its modules)."""
    yield model
    if isinstance(model, MixedNorm):
        yield from active_modules(model.candidates[model.active])
        return
    for child in model.children():
        yield from active_modules(child)


class Supernet(nn.Module):
    """The configured CNN with a :class:`MixedNorm` at every searched slot.

    Args:
        model_name: ``normsearch.models`` registry name.
        slot_options: slot label -> the ``NormSpec`` of each option at that slot (option order is
            the controller's index order).
        groups: decision name -> the slot labels it sets (one index for all of them).
        in_channels: image channels.
        num_classes: classifier outputs.
        **model_kwargs: further ``create_model`` arguments.

    Attributes:
        net: the CNN (labels as in the plain model; searched slots hold ``MixedNorm``).

    Shape:
        Input (N, in_channels, H, W) -> logits (N, num_classes).

    Raises:
        KeyError: a label is not a normalization slot of the model.
        ValueError: a slot without options, a grouped label without options, or groups whose
            slots disagree on the number of options.
    """

    def __init__(
        self,
        model_name: str,
        slot_options: Mapping[str, Sequence[NormSpec]],
        groups: Mapping[str, Sequence[str]],
        *,
        in_channels: int,
        num_classes: int,
        **model_kwargs: Any,
    ):
        super().__init__()
        self.model_name = model_name
        self.model_kwargs = {"in_channels": in_channels, "num_classes": num_classes, **model_kwargs}
        self.slot_options = {label: tuple(specs) for label, specs in slot_options.items()}
        self.groups = {name: tuple(labels) for name, labels in groups.items()}
        for name, labels in self.groups.items():
            sizes = {len(self.slot_options.get(lab, ())) for lab in labels}
            if 0 in sizes or len(sizes) != 1:
                raise ValueError(f"decision {name!r}: its slots {labels} need the same, non-zero number of options")
        self.net = create_model(model_name, **self.model_kwargs)
        slots = find_norm_slots(self.net)
        unknown = [lab for lab in self.slot_options if lab not in slots]
        if unknown:
            raise KeyError(f"no normalization slot {unknown} in {model_name}; slots: {list(slots)[:6]}...")
        for label, specs in self.slot_options.items():
            parent_label, _, attr = label.rpartition(".")
            parent = self.net.get_submodule(parent_label)
            setattr(parent, attr, MixedNorm([s.build(slots[label]) for s in specs]))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def mixed(self, label: str) -> MixedNorm:
        """The :class:`MixedNorm` at slot ``label``."""
        return self.net.get_submodule(label)

    def set_sample(self, actions: Mapping[str, int]) -> None:
        """Route every searched slot through option ``actions[decision]``.

        Raises:
            ValueError: a decision is missing or unknown, or an index is out of range.
        """
        missing = [n for n in self.groups if n not in actions]
        unknown = [n for n in actions if n not in self.groups]
        if missing or unknown:
            raise ValueError(f"set_sample: missing decisions {missing[:5]}, unknown {unknown[:5]}")
        for name, labels in self.groups.items():
            index = actions[name]
            n = len(self.slot_options[labels[0]])
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(f"set_sample: index for {name!r} must be an int in [0, {n}), got {index!r}")
            for label in labels:
                self.mixed(label).active = index

    def sample(self) -> dict[str, int]:
        """The current ``{decision: index}``."""
        return {name: self.mixed(labels[0]).active for name, labels in self.groups.items()}

    def child_spec(self, actions: Mapping[str, int], std_loss_weight: float = 0.0) -> ModelSpec:
        """The ``ModelSpec`` of the child ``actions`` selects (searched slots only)."""
        layers = {
            label: self.slot_options[label][actions[name]] for name, labels in self.groups.items() for label in labels
        }
        return ModelSpec(layers, std_loss_weight)


def child_from_supernet(supernet: Supernet, actions: Mapping[str, int]) -> nn.Module:
    """Standalone model of a child, carrying the supernet's shared and chosen per-slot state.

    The model is built by ``model_from_spec`` (the network an ordinary trial or ``normsearch
    export`` builds); the supernet's ``state_dict`` is mapped onto it (``<slot>.candidates.<i>.``
    -> ``<slot>.`` for the chosen ``i``) and loaded strictly. Placed on the supernet's device, in
    its train/eval mode. The supernet's own sample is left unchanged.

    Raises:
        ValueError: invalid ``actions`` (see :meth:`Supernet.set_sample`).
    """
    previous = supernet.sample()
    supernet.set_sample(actions)  # validates
    supernet.set_sample(previous)
    spec = supernet.child_spec(actions)
    child = model_from_spec(supernet.model_name, spec, **supernet.model_kwargs)
    chosen = {f"{lab}.candidates.": f"{actions[name]}." for name, labels in supernet.groups.items() for lab in labels}
    state = {}
    for key, value in supernet.net.state_dict().items():
        prefix = next((p for p in chosen if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        elif key[len(prefix):].startswith(chosen[prefix]):
            state[prefix.removesuffix("candidates.") + key[len(prefix) + len(chosen[prefix]):]] = value
    child.load_state_dict(state, strict=True)
    device = next(iter(supernet.parameters())).device
    return child.to(device).train(supernet.training)


def recalibrate(model: nn.Module, batches: Iterable[Any]) -> int:
    """Re-estimate the running statistics of every normalizer a forward pass of ``model`` uses.

    For a :class:`Supernet` these are the active child's normalizers (and the unsearched slots);
    the inactive candidates are untouched. Each layer follows its registered protocol
    (:func:`normsearch.norms.recalibrate`, which this calls with the child's
    :func:`active_modules`): SwitchNorm's batch average, a cumulative re-estimate otherwise.

    Args:
        model: a :class:`Supernet` with its sample set, or any model.
        batches: iterable of input tensors (N, C, H, W), or of ``(x, y)`` pairs; each is moved to
            the model's device.

    Returns:
        The number of batches used (0 when no active layer has running statistics: nothing runs).

    Raises:
        ValueError: ``batches`` is empty while some layer needs it.
    """
    return recalibrate_norms(model, batches, modules=active_modules(model))
