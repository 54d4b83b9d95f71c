"""Flatten a :class:`~normsearch.space.search_space.SearchSpace` into the ENAS controller's categorical decisions.

The controller (``normsearch.search.enas.controller``) only picks one index per labelled decision. A
space decision is a categorical over *choices*, each with its own hyper-parameter domains, so for
ENAS every decision's options are the cross product of its choices and their discrete parameter
values: choices ``[batchnorm, {kind: modenorm, num_components: [2, 3, 4]}]`` give four options
``batchnorm, modenorm(K=2), modenorm(K=3), modenorm(K=4)``. Categorical values are taken as
listed, integer ranges are expanded ``low, low + step, ..., <= high``; a float range has no finite
set of options, so it is a :class:`~normsearch.config.ConfigError` naming its YAML key path.

Standardization-loss weight (Collins, Balle, Shlens, Sec. 3): a searched weight is *fixed* for
ENAS at the middle of its range on the range's own scale (geometric ``sqrt(low * high)`` for a
``log: true`` range, the usual case, else arithmetic; snapped to its step/integer grid), with the
loss on (``std_loss.on = True`` when zero is allowed). The loss only acts on
training; a controller reward is the accuracy of a forward pass through the shared weights, which
the child's loss weight does not change, so a decision over it would receive no signal.

The mapping goes through the space's own documented parameter names (``normsearch.space.search_space``): an
option is a set of Optuna parameters, and :meth:`EnasSpace.spec` is ``space.decode`` of them, so
an ENAS child, an Optuna trial enqueued with :meth:`EnasSpace.params`, and a stored trial all
decode to the same :class:`~normsearch.space.spec.ModelSpec`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from normsearch.config import ConfigError, SpaceConfig
from normsearch.space.search_space import Categorical, Choice, Decision, Domain, Range, SearchSpace, match_labels
from normsearch.space.spec import ModelSpec, NormSpec
from normsearch.search.enas.controller import Decision as ControllerDecision

__all__ = ["EnasDecision", "EnasSpace", "Option", "middle_of_range"]

STD_ON = "std_loss.on"
STD_WEIGHT = "std_loss.weight"


@dataclass(frozen=True)
class Option:
    """One controller option: a choice with each searched hyper-parameter given a value.

    Attributes:
        choice: the space's choice (kind, fixed arguments, searched domains).
        values: ``(arg, value)`` for each of ``choice.searched``, in that order.
    """

    choice: Choice
    values: tuple[tuple[str, Any], ...]

    def describe(self) -> str:
        """Short text, e.g. ``modenorm(num_components=2)`` (the choice label plus its values)."""
        args = ", ".join(f"{k}={v}" for k, v in self.values)
        return f"{self.choice.label}({args})" if args else self.choice.label


@dataclass(frozen=True)
class EnasDecision(Decision):
    """A space :class:`~normsearch.space.Decision` with its flattened options.

    Attributes:
        options: the options, choices in YAML order, values in domain order (last arg fastest).
    """

    options: tuple[Option, ...]


def middle_of_range(dom: Range) -> float | int:
    """Middle of a range on the scale it is sampled on, on its grid.

    ``sqrt(low * high)`` (geometric) for a ``log`` range, ``(low + high) / 2`` otherwise. A
    ``step`` snaps the value to ``low + n * step``; an integer range rounds it to an int.
    """
    low, high = float(dom.low), float(dom.high)
    mid = math.sqrt(low * high) if dom.log else (low + high) / 2
    if dom.step:
        mid = min(low + round((mid - low) / dom.step) * dom.step, high)
    return int(round(mid)) if dom.integer else mid


def _discrete(dom: Domain, where: str) -> tuple[Any, ...]:
    if isinstance(dom, Categorical):
        return tuple(dom.values)
    if dom.integer:
        return tuple(range(int(dom.low), int(dom.high) + 1, int(dom.step or 1)))
    raise ConfigError(
        f"{where}: a float range ({dom.low}..{dom.high}) has no finite set of options, and the ENAS "
        f"backend needs discrete values; give a list of values or an integer range"
    )


def _owning_rules(cfg: SpaceConfig, labels: Sequence[str]) -> dict[str, int]:
    """Slot label -> index of the ``space.layers`` rule that owns it (later rules override)."""
    owner: dict[str, int] = {}
    for i, rule in enumerate(cfg.layers):
        for label in match_labels(rule.select, labels):
            owner[label] = i
    return owner


class EnasSpace:
    """A search space seen as a flat list of controller decisions.

    Args:
        space: the resolved search space.
        cfg: the YAML ``space`` section it came from; only used to name the key path
            (``space.layers[0].choices[1].eps``) of a float range in the error.

    Raises:
        ConfigError: a searched normalizer argument is a float range.
    """

    def __init__(self, space: SearchSpace, cfg: Optional[SpaceConfig] = None):
        self.space = space
        owner = _owning_rules(cfg, list(space.slots)) if cfg is not None else {}
        self.decisions: list[EnasDecision] = []
        for d in space.decisions:
            options = []
            for j, choice in enumerate(d.choices):
                rule = owner.get(d.labels[0])
                prefix = f"space.layers[{rule}].choices[{j}]" if rule is not None else f"parameter {d.name}.{choice.label}"
                grids = [_discrete(dom, f"{prefix}.{arg}") for arg, dom in choice.searched]
                args = [arg for arg, _ in choice.searched]
                options += [Option(choice, tuple(zip(args, combo))) for combo in itertools.product(*grids)]
            self.decisions.append(EnasDecision(d.name, d.labels, d.choices, tuple(options)))
        self._by_name = {d.name: d for d in self.decisions}
        self.std_params: dict[str, Any] = {}
        if isinstance(space.std_weight, Range):
            if space.std_allow_zero:
                self.std_params[STD_ON] = True
            self.std_params[STD_WEIGHT] = middle_of_range(space.std_weight)
        self._option_specs = {d.name: self._specs_of(d) for d in self.decisions}

    # -- controller side ------------------------------------------------------------------------
    def controller_decisions(self) -> list[ControllerDecision]:
        """One controller ``Decision(name, num_options)`` per space decision, in the space's (model) order."""
        return [ControllerDecision(d.name, len(d.options)) for d in self.decisions]

    def _check(self, actions: Mapping[str, int]) -> None:
        missing = [d.name for d in self.decisions if d.name not in actions]
        unknown = [n for n in actions if n not in self._by_name]
        if missing or unknown:
            raise ValueError(f"actions must name every decision: missing {missing[:5]}, unknown {unknown[:5]}")
        for name, index in actions.items():
            n = len(self._by_name[name].options)
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
                raise ValueError(f"action for {name!r} must be an int in [0, {n}), got {index!r}")

    def option(self, name: str, index: int) -> Option:
        """Option ``index`` of decision ``name``."""
        return self._by_name[name].options[index]

    # -- study side -----------------------------------------------------------------------------
    def params(self, actions: Mapping[str, int]) -> dict[str, Any]:
        """The flat Optuna parameters of a child: what ``SearchSpace.suggest`` would record.

        Includes the fixed standardization-loss parameters when the space searches the weight.

        Raises:
            ValueError: ``actions`` does not give every decision a valid index.
        """
        self._check(actions)
        params = dict(self.std_params)
        for d in self.decisions:
            opt = d.options[actions[d.name]]
            label = opt.choice.label
            if len(d.choices) > 1:
                params[d.name] = label
            params |= {d.param_name(label, arg): value for arg, value in opt.values}
        return params

    def spec(self, actions: Mapping[str, int]) -> ModelSpec:
        """The :class:`ModelSpec` of a child (``space.decode(self.params(actions))``)."""
        return self.space.decode(self.params(actions))

    def actions(self, params: Mapping[str, Any]) -> dict[str, int]:
        """Inverse of :meth:`params`: the option indices a flat parameter dict stands for.

        Raises:
            ValueError: a value is not one of the decision's discrete options.
            KeyError: a parameter is missing.
        """
        out = {}
        for d in self.decisions:
            label = params[d.name] if len(d.choices) > 1 else d.choices[0].label
            for i, opt in enumerate(d.options):
                if opt.choice.label == label and all(params[d.param_name(label, a)] == v for a, v in opt.values):
                    out[d.name] = i
                    break
            else:
                raise ValueError(f"decision {d.name!r}: parameters {dict(params)} match none of its ENAS options")
        return out

    def actions_from_spec(self, spec: ModelSpec) -> dict[str, int]:
        """The option indices whose child is ``spec`` (the first match where options coincide).

        Raises:
            ValueError: a slot's normalizer is none of its decision's options (with this space's
                fixed standardization-loss setting).
        """
        out = {}
        for d in self.decisions:
            wanted = {lab: spec.layers.get(lab) for lab in d.labels}
            for i, layer_specs in enumerate(self._option_specs[d.name]):
                if layer_specs == wanted:
                    out[d.name] = i
                    break
            else:
                raise ValueError(f"decision {d.name!r}: {wanted} is none of its ENAS options")
        return out

    def slot_options(self) -> dict[str, list[NormSpec]]:
        """Slot label -> the ``NormSpec`` each option of its decision puts there (for the supernet)."""
        return {lab: [s[lab] for s in self._option_specs[d.name]] for d in self.decisions for lab in d.labels}

    def groups(self) -> dict[str, tuple[str, ...]]:
        """Decision name -> the slot labels it governs."""
        return {d.name: d.labels for d in self.decisions}

    def _specs_of(self, d: EnasDecision) -> list[dict[str, NormSpec]]:
        """Per option of ``d``: its slots' NormSpecs, decoded by the space (all else at option 0)."""
        base = {other.name: 0 for other in self.decisions}
        return [
            {lab: self.spec(base | {d.name: i}).layers[lab] for lab in d.labels} for i in range(len(d.options))
        ]

    @property
    def std_loss_weight(self) -> float:
        """The standardization-loss weight every child trains with."""
        return self.spec({d.name: 0 for d in self.decisions}).std_loss_weight

    def __repr__(self) -> str:
        sizes = [len(d.options) for d in self.decisions]
        return f"EnasSpace({len(sizes)} decisions, options per decision {sizes})"
