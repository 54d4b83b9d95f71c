"""Checks a run configuration needs beyond its schema, done before ``normsearch run`` writes anything.

:mod:`normsearch.config` is a leaf package (it imports nothing else of normsearch), so the values
that only the registries, the data or the machine can judge are checked here, one layer up:

* :func:`check_names`: ``data.dataset``, ``model.name`` and ``search.references`` against the
  dataset, model and normalizer registries (:func:`load_config` = schema + these);
* :func:`preflight`: additionally the run directory and storage URL, ``train.device``, the data
  sizes (``data.val_size``/``train_size``/``test_size`` against the dataset's splits), the model on
  the dataset's images (``model.kwargs``, image size) and ``space.std_loss.select``.

Every failure is a :class:`~normsearch.config.ConfigError` whose one-line message starts with the
YAML key path (with ``source`` given, with the file first), so the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional, Union

from normsearch.config import ConfigError, StudyConfig
from normsearch.config import read_config


def _fail(key: str, msg: str, source: Optional[str]) -> ConfigError:
    return ConfigError(f"{source + ': ' if source else ''}{key}: {msg}")


def check_names(cfg: StudyConfig, source: Optional[str] = None) -> StudyConfig:
    """Check the registry names of ``cfg``; returns ``cfg`` unchanged.

    Args:
        cfg: a schema-valid configuration.
        source: the file name to put in front of the key path (``None`` = key path only).

    Raises:
        ConfigError: ``data.dataset``, ``model.name``, ``search.backend`` or a
            ``search.references`` entry is not registered (the message lists the valid names).
    """
    from normsearch.data import list_datasets
    from normsearch.models import list_models
    from normsearch.norms import list_norms
    from normsearch.search.registry import list_backends

    for key, value, valid, what in (("data.dataset", cfg.data.dataset, list_datasets(), "dataset"),
                                    ("model.name", cfg.model.name, list_models(), "model"),
                                    ("search.backend", cfg.search.backend, list_backends(), "backend")):
        if value not in valid:
            raise _fail(key, f"unknown {what} {value!r}; valid: {', '.join(valid)}", source)
    for i, ref in enumerate(cfg.search.references):
        if ref not in list_norms():
            raise _fail(f"search.references[{i}]", f"unknown normalizer {ref!r}; valid: {', '.join(list_norms())}",
                        source)
    check_corruptions(cfg, source)
    return cfg


def check_corruptions(cfg: StudyConfig, source: Optional[str] = None) -> None:
    """``data.eval_corruptions``: known names, severities 1-5, and corruptions that apply to the
    dataset's image shape (from its registry entry; no data is read).

    Raises:
        ConfigError: ``data.eval_corruptions[i].name: unknown corruption ...`` and the like.
    """
    from normsearch.data import get_dataset_info
    from normsearch.data.corruptions import check_corruption

    if "clean_val_acc" in cfg.search.objectives and not cfg.data.eval_corruptions:
        raise _fail("search.objectives", "clean_val_acc needs data.eval_corruptions (else val_acc is the clean "
                    "accuracy already)", source)
    if not cfg.data.eval_corruptions:
        return
    info = get_dataset_info(cfg.data.dataset)
    for i, c in enumerate(cfg.data.eval_corruptions):
        path = f"data.eval_corruptions[{i}]"
        try:
            check_corruption(c.name, c.severity, info.in_channels, info.image_size, path)
        except ValueError as err:
            key, _, message = str(err).partition(": ")
            raise _fail(key, message, source) from None


def load_config(path: Union[str, Path]) -> StudyConfig:
    """Read a run configuration YAML file and check it against the schema and the registries.

    Raises:
        ConfigError: as :func:`normsearch.config.read_config`, or an unknown registry name
            (:func:`check_names`); one line ``path: key.path: message``.
    """
    return check_names(read_config(path), str(path))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def check_outputs(cfg: StudyConfig) -> None:
    """Check that the run directory can be made and the storage URL can be opened, without writing.

    The storage check parses the SQLAlchemy URL and loads its dialect and driver (``create_engine``
    does not connect); a SQLite file must be in an existing folder or in ``run_dir``.

    Raises:
        ConfigError: ``run_dir`` is a file (or under one) or an existing folder not writable by
            this user; ``storage`` is malformed, names an unknown dialect or a driver that is not
            installed, or a SQLite file in a missing folder.
    """
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError

    run_dir = cfg.resolved_run_dir()
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise _fail("run_dir", f"{existing} is a file, not a folder", None)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _fail("run_dir", f"{existing} is not writable", None)
    url = cfg.resolved_storage()
    try:
        parsed = sqlalchemy.make_url(url)
        sqlalchemy.create_engine(parsed).dispose()
    except ArgumentError as err:
        raise _fail("storage", f"{url!r} is not a usable SQLAlchemy URL ({_first_line(err)})", None) from None
    except ImportError as err:
        raise _fail("storage", f"{url!r} needs a database driver that is not installed ({_first_line(err)})",
                    None) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().absolute().parent
        if not folder.is_dir() and folder != run_dir.absolute():
            raise _fail("storage", f"{url!r}: folder {folder} does not exist", None)


def check_model(cfg: StudyConfig, in_channels: int, image_size: tuple[int, int]) -> dict[str, int]:
    """Build the configured model for the data's shape and run it once on two blank images.

    Args:
        cfg: the configuration (``model``, ``data.dataset``).
        in_channels: image channels C of the dataset.
        image_size: (H, W) in pixels.

    Returns:
        The model's normalization slots, label -> num_features (:func:`normsearch.space.surgery.find_norm_slots`).

    Raises:
        ConfigError: ``model.kwargs`` the model does not take or rejects, or a model whose
            forward pass fails on (2, C, H, W) images (e.g. too small for its kernels).
    """
    import torch

    from normsearch.data import get_dataset_info
    from normsearch.models import create_model
    from normsearch.space.surgery import find_norm_slots

    num_classes = get_dataset_info(cfg.data.dataset).num_classes
    try:
        model = create_model(cfg.model.name, in_channels=in_channels, num_classes=num_classes, **cfg.model.kwargs)
    except (TypeError, ValueError) as err:
        raise _fail("model.kwargs", f"{cfg.model.name}: {_first_line(err)}", None) from None
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, in_channels, *image_size))
    except (RuntimeError, ValueError) as err:
        raise _fail("model.name", f"{cfg.model.name} cannot take {cfg.data.dataset}'s {in_channels}x"
                    f"{image_size[0]}x{image_size[1]} images ({_first_line(err)})", None) from None
    return find_norm_slots(model)


def check_device(cfg: StudyConfig) -> None:
    """``train.device`` names a device this machine has (:func:`normsearch.train.resolve_device`).

    Raises:
        ConfigError: ``train.device: ...`` naming what is missing.
    """
    from normsearch.train.runtime import resolve_device

    try:
        resolve_device(cfg.train.device)
    except ValueError as err:
        raise _fail("train.device", str(err).removeprefix("device: "), None) from None


def check_std_loss(cfg: StudyConfig, slots: Mapping[str, int]) -> None:
    """``space.std_loss.select`` matches at least one normalization slot (when given).

    Raises:
        ConfigError: a pattern that matches no slot, listing the first slots.
    """
    from normsearch.space.search_space import match_labels

    select = cfg.space.std_loss.select
    if select != [] and not match_labels(select, list(slots)):
        labels = list(slots)
        raise _fail("space.std_loss.select", f"{select!r} matches no normalization slot of {cfg.model.name} "
                    f"(slots: {', '.join(labels[:6])}{', ...' if len(labels) > 6 else ''})", None)


__all__ = ["check_corruptions", "check_device", "check_model", "check_names", "check_outputs", "check_std_loss",
           "load_config"]
