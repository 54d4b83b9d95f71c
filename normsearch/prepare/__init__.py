"""Everything checked and resolved before a run writes anything: :func:`load_config` (schema and
registry names), :func:`prepare` (-> :class:`Prepared`) and the individual checks."""

from normsearch.prepare.checks import check_corruptions, check_device, check_model, check_names, check_outputs
from normsearch.prepare.checks import check_std_loss, load_config
from normsearch.prepare.prepared import Prepared, ensure_prepared, prepare

__all__ = [
    "Prepared", "check_corruptions", "check_device", "check_model", "check_names", "check_outputs", "check_std_loss",
    "ensure_prepared", "load_config", "prepare",
]
