"""The search space: labelled per-layer decisions resolved against a model's normalization slots.

A :class:`SearchSpace` is built from the YAML ``space`` section and the model's slots
(``surgery.find_norm_slots``). It is a list of :class:`Decision` (one categorical choice of
normalizer per layer, or per group of layers with ``share: true``), each choice with its own
hyper-parameter domains, plus the standardization-loss weight. A search strategy only ever sees
these labelled choices: Optuna asks through :meth:`SearchSpace.suggest`, any flat parameter dict
(Ray's config, a stored trial) turns back into a :class:`~normsearch.space.spec.ModelSpec` with
:meth:`SearchSpace.decode`.

Parameter names in the study: the categorical of a decision is named by its layer label
(``layer1.0.bn1``) or its rule name; a choice's hyper-parameter is ``<decision>.<choice>.<arg>``
(``layer1.0.bn1.modenorm.num_components``); the loss weight is ``std_loss.weight`` with
``std_loss.on`` when zero is allowed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

from pydantic import ValidationError

from normsearch.config import ChoiceConfig, ConfigError, RangeConfig, SpaceConfig, format_validation_error
from normsearch.norms import create_norm_layer, get_norm_entry
from normsearch.space.spec import ModelSpec, NormSpec


@dataclass(frozen=True)
class Categorical:
    """Pick one of ``values``."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class Range:
    """A numeric range; ``integer`` ranges give ints."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False


Domain = Union[Categorical, Range]
#: ``ask(name, domain) -> value``: how a strategy answers one question of the space.
Ask = Callable[[str, Domain], Any]


@dataclass(frozen=True)
class Choice:
    """One candidate normalizer of a decision: fixed keyword args plus searched domains."""

    label: str
    kind: str
    std_loss: bool
    fixed: tuple[tuple[str, Any], ...]
    searched: tuple[tuple[str, Domain], ...]


@dataclass(frozen=True)
class Decision:
    """A labelled categorical choice governing one or more slots."""

    name: str
    labels: tuple[str, ...]
    choices: tuple[Choice, ...]

    def param_name(self, label: str, arg: str) -> str:
        """The study parameter of choice ``label``'s searched argument ``arg``: ``"<decision>.<label>.<arg>"``."""
        return f"{self.name}.{label}.{arg}"


def match_labels(select: Union[str, Sequence[str]], labels: Sequence[str]) -> list[str]:
    """Labels matched by ``select`` (``"all"``, a glob, or a list of globs), in model order."""
    patterns = [select] if isinstance(select, str) else list(select)
    if "all" in patterns:
        return list(labels)
    return [lab for lab in labels if any(fnmatch.fnmatchcase(lab, p) for p in patterns)]


def _domain(value: Any, path: str) -> Domain | None:
    """Parse one YAML hyper-parameter value: scalar -> None (fixed), list, or range mapping."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{path}: empty list of values")
        return Categorical(tuple(value))
    if isinstance(value, dict):
        try:
            r = RangeConfig.model_validate(value)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, path).replace(": <top level>", "")) from None
        return Range(r.low, r.high, r.step, r.log, r.is_int)
    return None


def _probe_values(domain: Domain | None, fixed: Any) -> list[Any]:
    if domain is None:
        return [fixed]
    if isinstance(domain, Categorical):
        return list(domain.values)
    cast = int if domain.integer else float
    return [cast(domain.low), cast(domain.high)]


def _finite_values(dom: Domain, name: str) -> list[Any]:
    """All values of a categorical or integer domain.

    Raises:
        ValueError: a continuous (float) range.
    """
    if isinstance(dom, Categorical):
        return list(dom.values)
    if not dom.integer:
        raise ValueError(f"{name} is a continuous range ({dom.low:g} to {dom.high:g}): not enumerable; "
                         "give it a list of values")
    if dom.log and dom.step is None:
        return list(range(int(dom.low), int(dom.high) + 1))
    return list(range(int(dom.low), int(dom.high) + 1, int(dom.step or 1)))


def _parse_choice(c: ChoiceConfig, path: str, slots: Mapping[str, int], labels: Sequence[str]) -> Choice:
    try:
        entry = get_norm_entry(c.kind)
    except KeyError as err:
        raise ConfigError(f"{path}.kind: {err.args[0]}") from None
    accepted = entry.accepted_kwargs()
    fixed, searched = [], []
    for arg, value in c.params.items():
        if arg not in accepted:
            raise ConfigError(
                f"{path}.{arg}: normalizer {c.kind!r} takes no argument {arg!r}; "
                f"accepted: {', '.join(accepted) or 'none'}"
            )
        dom = _domain(value, f"{path}.{arg}")
        (fixed.append((arg, value)) if dom is None else searched.append((arg, dom)))
    # Build the layer once per distinct width and per probed value, so that e.g. a group count
    # that does not divide a layer's width is reported now rather than failing trials later.
    base = dict(fixed) | {a: _probe_values(d, None)[0] for a, d in searched}
    for width in sorted({slots[lab] for lab in labels}):
        for arg, dom in searched or [(None, None)]:
            for v in _probe_values(dom, None) if arg else [None]:
                kwargs = base | ({arg: v} if arg else {})
                try:
                    create_norm_layer(c.kind, width, **kwargs)
                except Exception as err:  # noqa: BLE001 - any build error is a config error here
                    where = f".{arg}" if arg else ""
                    lab = next(lab for lab in labels if slots[lab] == width)
                    raise ConfigError(
                        f"{path}{where}: cannot build {c.kind} for layer {lab!r} "
                        f"(num_features={width}): {err}"
                    ) from None
    return Choice(c.label, c.kind, c.std_loss, tuple(sorted(fixed)), tuple(searched))


class SearchSpace:
    """Per-layer normalizer decisions for one model.

    Args:
        decisions: the labelled decisions (each slot appears in at most one).
        slots: every normalization slot of the model, label -> num_features.
        std_weight: fixed standardization-loss weight or a :class:`Range` to search.
        std_allow_zero: with a range, add an on/off categorical ``std_loss.on``.
        std_labels: slots tapped by the loss whatever their choice.
    """

    def __init__(
        self,
        decisions: Sequence[Decision],
        slots: Mapping[str, int],
        std_weight: float | Range = 0.0,
        std_allow_zero: bool = True,
        std_labels: Sequence[str] = (),
    ):
        self.decisions = list(decisions)
        self.slots = dict(slots)
        self.std_weight = std_weight
        self.std_allow_zero = std_allow_zero
        self.std_labels = frozenset(std_labels)

    @classmethod
    def from_config(cls, cfg: SpaceConfig, slots: Mapping[str, int], model_name: str = "model") -> "SearchSpace":
        """Resolve the YAML space against a model's slots.

        Raises:
            ConfigError: a pattern matching no slot, an unknown normalizer or argument, an empty or
                inverted range, duplicate choice names, or a choice that cannot be built for a
                matched layer; the message names the YAML key path.
        """
        labels = list(slots)
        owner: dict[str, int] = {}
        parsed: list[tuple[int, list[str], list[Choice]]] = []
        for i, rule in enumerate(cfg.layers):
            path = f"space.layers[{i}]"
            matched = match_labels(rule.select, labels)
            if not matched:
                raise ConfigError(
                    f"{path}.select: {rule.select!r} matches no normalization slot of {model_name} "
                    f"(slots: {', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''})"
                )
            choices = [_parse_choice(c, f"{path}.choices[{j}]", slots, matched) for j, c in enumerate(rule.choices)]
            names = [c.label for c in choices]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ConfigError(f"{path}.choices: choice {dup[0]!r} appears twice; give one a 'name'")
            for lab in matched:
                owner[lab] = i  # later rules override earlier ones
            parsed.append((i, matched, choices))
        decisions = []
        for i, matched, choices in parsed:
            mine = [lab for lab in matched if owner[lab] == i]
            if not mine:
                continue
            rule = cfg.layers[i]
            if rule.share:
                decisions.append(Decision(rule.name or f"rule{i}", tuple(mine), tuple(choices)))
            else:
                decisions.extend(Decision(lab, (lab,), tuple(choices)) for lab in mine)
        std = cfg.std_loss
        weight = std.weight if isinstance(std.weight, float) else _domain(std.weight.model_dump(), "space.std_loss.weight")
        std_labels = match_labels(std.select, labels) if std.select != [] else []
        return cls(decisions, slots, weight, std.allow_zero, std_labels)

    # ---------------------------------------------------------------------------------------
    def walk(self, ask: Ask) -> ModelSpec:
        """Build a ModelSpec by asking ``ask(name, domain)`` for every relevant parameter."""
        std_weight = 0.0
        if isinstance(self.std_weight, Range):
            on = ask("std_loss.on", Categorical((False, True))) if self.std_allow_zero else True
            std_weight = float(ask("std_loss.weight", self.std_weight)) if on else 0.0
        else:
            std_weight = float(self.std_weight)
        layers: dict[str, NormSpec] = {}
        for d in self.decisions:
            if len(d.choices) == 1:
                choice = d.choices[0]
            else:
                picked = ask(d.name, Categorical(tuple(c.label for c in d.choices)))
                choice = next(c for c in d.choices if c.label == picked)
            kwargs = dict(choice.fixed)
            for arg, dom in choice.searched:
                kwargs[arg] = ask(d.param_name(choice.label, arg), dom)
            for lab in d.labels:
                tap = std_weight > 0 and (choice.std_loss or lab in self.std_labels)
                layers[lab] = NormSpec.make(choice.kind, std_loss=tap, **kwargs)
        return ModelSpec(layers, std_weight)

    def suggest(self, trial: Any) -> ModelSpec:
        """Sample a ModelSpec with an Optuna ``Trial`` (define-by-run; works inside Ray's OptunaSearch)."""

        def ask(name: str, dom: Domain) -> Any:
            if isinstance(dom, Categorical):
                return trial.suggest_categorical(name, list(dom.values))
            if dom.integer:
                return trial.suggest_int(name, int(dom.low), int(dom.high), step=int(dom.step or 1), log=dom.log)
            return trial.suggest_float(name, dom.low, dom.high, step=dom.step, log=dom.log)

        return self.walk(ask)

    def decode(self, params: Mapping[str, Any]) -> ModelSpec:
        """The ModelSpec a flat parameter dict (``trial.params``, Ray's config) stands for.

        Raises:
            KeyError: a parameter the space needs is missing from ``params``.
        """

        def ask(name: str, dom: Domain) -> Any:
            if name not in params:
                raise KeyError(f"parameter {name!r} missing from the trial's params")
            return params[name]

        return self.walk(ask)

    def default(self) -> ModelSpec:
        """The first choice everywhere at its lowest values, loss off: a deterministic baseline."""

        def ask(name: str, dom: Domain) -> Any:
            return _probe_values(dom, None)[0]

        return self.walk(ask)

    def uniform_params(self, kind: str) -> dict[str, Any]:
        """Flat params (as ``decode`` reads them) of the uniform spec "``kind`` in every slot, loss off".

        Each decision takes its first choice of that ``kind`` without the standardization loss, at
        its first (lowest) values for searched arguments; this is how a reference arm such as
        all-BatchNorm is expressed in the study's own parameters, so every backend and the
        dashboard treat it like any sampled trial.

        Raises:
            ValueError: a slot offers no ``kind`` choice without ``std_loss`` (the message names the
                slot and its choices), or the standardization loss cannot be switched off
                (``space.std_loss`` is a range with ``allow_zero: false``).
        """
        params: dict[str, Any] = {}
        if isinstance(self.std_weight, Range):
            if not self.std_allow_zero:
                raise ValueError("the standardization loss cannot be switched off (space.std_loss.allow_zero is false)")
            params["std_loss.on"] = False
        for d in self.decisions:
            choice = next((c for c in d.choices if c.kind == kind and not c.std_loss), None)
            if choice is None:
                offered = ", ".join(c.label for c in d.choices)
                raise ValueError(f"slot {d.labels[0]!r} does not offer {kind!r} (its choices: {offered})")
            if len(d.choices) > 1:
                params[d.name] = choice.label
            for arg, dom in choice.searched:
                params[d.param_name(choice.label, arg)] = _probe_values(dom, None)[0]
        return params

    def all_params(self, limit: int) -> list[dict[str, Any]]:
        """Every configuration of the space as flat params (as :meth:`decode` reads them), in
        odometer order of the questions :meth:`walk` asks (define-by-run: a choice's own arguments
        are asked only where that choice is taken).

        Raises:
            ValueError: a continuous range (not enumerable: the message names the parameter), or
                more than ``limit`` configurations.
        """
        out: list[dict[str, Any]] = []
        prefix: list[int] = []
        while True:
            sizes: list[int] = []
            params: dict[str, Any] = {}

            def ask(name: str, dom: Domain) -> Any:
                values = _finite_values(dom, name)
                i = prefix[len(sizes)] if len(sizes) < len(prefix) else 0
                sizes.append(len(values))
                params[name] = values[i]
                return values[i]

            self.walk(ask)
            out.append(params)
            if len(out) > limit:
                raise ValueError(f"the space has more than {limit} configurations")
            digits = prefix + [0] * (len(sizes) - len(prefix))
            while digits and digits[-1] + 1 >= sizes[len(digits) - 1]:
                digits.pop()
            if not digits:
                return out
            digits[-1] += 1
            prefix = digits

    def __len__(self) -> int:
        return len(self.decisions)

    def __repr__(self) -> str:
        return f"SearchSpace({len(self.decisions)} decisions over {len(self.slots)} slots)"
