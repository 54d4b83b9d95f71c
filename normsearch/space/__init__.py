"""The search space: per-layer choices, the chosen specs, and model surgery.

- :mod:`~normsearch.space.search_space`: :class:`SearchSpace` resolved from ``space:`` rules
  against a model's norm slots (domains, decisions, sampling);
- :mod:`~normsearch.space.spec`: :class:`NormSpec` (one layer's choice) and :class:`ModelSpec`
  (slot label -> NormSpec);
- :mod:`~normsearch.space.surgery`: find a model's norm slots, build a model from a spec;
- :mod:`~normsearch.space.bundled`: the search spaces shipped with the package.
"""

from normsearch.space.bundled import SpaceInfo, format_spaces, list_spaces, resolve_config
from normsearch.space.search_space import Categorical, Choice, Decision, Domain, Range, SearchSpace, match_labels
from normsearch.space.spec import ModelSpec, NormSpec, kind_short
from normsearch.space.surgery import apply_model_spec, count_parameters, find_norm_slots, model_from_spec

__all__ = [
    "Categorical", "Choice", "Decision", "Domain", "ModelSpec", "NormSpec", "Range", "SearchSpace", "SpaceInfo",
    "apply_model_spec", "count_parameters", "find_norm_slots", "format_spaces", "kind_short", "list_spaces",
    "match_labels", "model_from_spec", "resolve_config",
]
