"""``prepare(cfg) -> Prepared``: everything checked and resolved once, before a run writes anything.

``normsearch run``, ``check`` and ``audit`` (and :func:`normsearch.run`) all start from a
:class:`Prepared`: the configuration with its registry names checked, the model's norm slots, the
search space resolved against them, the reference arms' params, the backend and its own view of the
space (ENAS: the controller's decisions), and the notes to show the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from normsearch.config import ConfigError, StudyConfig
from normsearch.prepare.checks import check_model, check_names, check_outputs, check_std_loss, check_device
from normsearch.search import Backend, get_backend
from normsearch.space import SearchSpace

__all__ = ["Prepared", "prepare"]

#: Sections that define what a study's trials mean; a run directory refuses a config changing them.
STUDY_DEFINING = ("data", "model", "train", "space")


@dataclass(frozen=True)
class Prepared:
    """A configuration checked and resolved by :func:`prepare`; nothing written yet.

    Attributes:
        cfg: the validated configuration.
        slots: the model's normalization slots, label -> num_features (channels).
        space: the search space resolved against ``slots``.
        references: ``{name: params}`` of the reference arms (``search.references``).
        backend: the registered :class:`~normsearch.search.Backend` of ``search.backend``.
        backend_space: what ``backend.resolve`` returned (ENAS: its ``EnasSpace``; else ``None``).
        notes: one-line remarks for the user (e.g. a default reference left out).
        data_checked: whether the dataset was loaded and the run directory and storage checked
            (``prepare(cfg, data=True)``), as ``run`` needs; ``check`` reads no data.
    """

    cfg: StudyConfig
    slots: Mapping[str, int]
    space: SearchSpace
    references: Mapping[str, Mapping[str, Any]]
    backend: Backend
    backend_space: Any = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    data_checked: bool = True


def _check_run_dir(cfg: StudyConfig) -> None:
    """A run directory holding a study of another configuration is refused."""
    saved = cfg.resolved_run_dir() / "config.yaml"
    if not saved.exists():
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = cfg.model_dump(mode="json")
    changed = [k for k in STUDY_DEFINING if old.get(k) != new.get(k)]
    if changed:
        raise ConfigError(f"{saved}: this run directory holds a study of a different configuration "
                          f"(differs in: {', '.join(changed)}); set run_dir or name to start a new study")


def prepare(cfg: StudyConfig, *, data: bool = True) -> Prepared:
    """Check ``cfg`` and resolve what a run needs, writing nothing.

    In order: registry names (:func:`~normsearch.prepare.checks.check_names`), ``train.device``,
    with ``data``: the run directory and storage URL and the dataset's files and split sizes (the
    dataset is read once per process), else the image shape from the dataset registry; the model
    built once on blank images (its slots), ``space.std_loss.select``, the space, the backend's own
    checks (:meth:`~normsearch.search.Backend.resolve`), the reference arms, and a run directory
    created by another configuration.

    Args:
        cfg: a schema-valid configuration (:func:`normsearch.config.read_config` or
            :func:`normsearch.prepare.load_config`).
        data: load the dataset and check the outputs (``run``, ``audit``); ``False`` for ``check``,
            which reads no data and writes nothing.

    Raises:
        ConfigError: one line starting with the key path.
        normsearch.data.DataError: the dataset's files are missing and cannot be downloaded.
    """
    from normsearch.confirm.candidates import reference_params
    from normsearch.data import get_dataset_info, load_data

    check_names(cfg)
    check_device(cfg)
    if data:
        check_outputs(cfg)
        bundle = load_data(cfg.data)
        in_channels, image_size = bundle.in_channels, bundle.image_size
    else:
        info = get_dataset_info(cfg.data.dataset)
        in_channels, image_size = info.in_channels, info.image_size
    slots = check_model(cfg, in_channels, image_size)
    check_std_loss(cfg, slots)
    space = SearchSpace.from_config(cfg.space, slots, cfg.model.name)
    backend = get_backend(cfg.search.backend)
    backend_space = backend.resolve(cfg, space)
    notes: list[str] = []
    references = reference_params(cfg, space, notes)
    if data:
        _check_run_dir(cfg)
    return Prepared(cfg, slots, space, references, backend, backend_space, tuple(notes), data)


def ensure_prepared(target: "Prepared | StudyConfig", *, data: bool = True) -> Prepared:
    """``target`` itself if prepared, else :func:`prepare` of it (for library callers passing a config).

    Raises:
        ConfigError, normsearch.data.DataError: as :func:`prepare`.
    """
    return target if isinstance(target, Prepared) else prepare(target, data=data)
