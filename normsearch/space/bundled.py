"""Bundled search spaces: the YAML files of the repository's ``search_spaces/`` folder, by name.

The folder stays at the repository's top level and ships inside the built package as
``normsearch/search_spaces/`` (``pyproject.toml`` maps the package ``normsearch.search_spaces`` to
it), so one copy serves a source checkout, an editable install and an installed wheel.

``resolve_config("cifar_resnet20")``, ``resolve_config("cifar_resnet20.yaml")`` and
``resolve_config("search_spaces/cifar_resnet20.yaml")`` all name the same file; an existing path
always wins over a bundled name.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from normsearch.config import ConfigError, read_config

#: Suffixes a bundled name may carry (``cifar_resnet20.yaml`` == ``cifar_resnet20``).
_SUFFIXES = (".yaml", ".yml")


def bundled_dir() -> Optional[Path]:
    """Folder of the bundled search spaces, or ``None`` when neither location exists.

    An installed wheel holds them in ``normsearch/search_spaces/``; a source checkout (and an
    editable install, whose package is that checkout) in ``search_spaces/`` beside the package.
    """
    pkg = Path(str(resources.files("normsearch")))
    for candidate in (pkg / "search_spaces", pkg.parent / "search_spaces"):
        if candidate.is_dir():
            return candidate
    return None


def bundled_files() -> dict[str, Path]:
    """Bundled search spaces, name (file stem) -> file, sorted by name."""
    folder = bundled_dir()
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in _SUFFIXES and p.is_file()}


def resolve_config(arg: str) -> Path:
    """The YAML file ``normsearch run|check ARG`` means.

    Args:
        arg: a path to a YAML file, or a bundled name with or without ``.yaml``.

    Returns:
        ``arg`` itself when it names an existing file, else the bundled file of that name.

    Raises:
        ConfigError: ``arg`` is a directory, or neither an existing file nor a bundled name (the
            one-line message lists the bundled names).
    """
    path = Path(arg).expanduser()
    if path.is_dir():
        shown = arg if arg.endswith("/") else arg + "/"  # "data/": not read as the config key path "data"
        raise ConfigError(f"{shown}: is a directory; give a search-space YAML file or a bundled name "
                          f"({', '.join(bundled_files()) or 'none installed'})")
    if path.exists():
        return path
    name = path.name
    for suffix in _SUFFIXES:
        name = name.removesuffix(suffix)
    bundled = bundled_files()
    if path.parent == Path(".") and name in bundled:
        return bundled[name]
    raise ConfigError(f"{arg}: no such file, and not a bundled search space "
                      f"(bundled: {', '.join(bundled) or 'none installed'}; `normsearch spaces` lists them)")


@dataclass(frozen=True)
class SpaceInfo:
    """One bundled search space, as ``normsearch spaces`` prints it.

    Attributes:
        name: file stem (what ``normsearch run NAME`` takes).
        model, dataset, backend: registry names from the file.
        trials: ``search.n_trials``.
        epochs: ``train.epochs`` per trial.
        purpose: the file's first comment line (its ``#`` stripped).
        path: the file.
        expected_winner: for a known-answer space, its ``# Expected winner:`` header line (else "").
    """

    name: str
    model: str
    dataset: str
    trials: int
    epochs: int
    backend: str
    purpose: str
    path: Path
    expected_winner: str = ""


def _purpose(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def _expected_winner(text: str) -> str:
    """The ``# Expected winner: ...`` header line of a known-answer space, without its prefix."""
    for line in text.splitlines():
        if line.startswith("# Expected winner:"):
            return line.removeprefix("# Expected winner:").strip()
    return ""


def describe(path: Path) -> SpaceInfo:
    """Validate a search-space file and summarize it.

    Raises:
        ConfigError: the file is not valid YAML or not a valid configuration.
    """
    cfg = read_config(path)
    return SpaceInfo(path.stem, cfg.model.name, cfg.data.dataset, cfg.search.n_trials, cfg.train.epochs,
                     cfg.search.backend, _purpose(path.read_text()), path, _expected_winner(path.read_text()))


def list_spaces() -> list[SpaceInfo]:
    """Every bundled search space, sorted by name.

    Raises:
        ConfigError: a bundled file is invalid (a packaging bug; the message names the file).
    """
    return [describe(p) for p in bundled_files().values()]


def format_spaces(infos: list[SpaceInfo]) -> str:
    """A plain-text table (one header line, one line per space) for ``normsearch spaces``; a
    known-answer space's purpose ends with its expected winner."""
    rows = [("name", "model", "dataset", "trials", "epochs", "backend", "purpose")]
    rows += [(i.name, i.model, i.dataset, str(i.trials), str(i.epochs), i.backend,
              i.purpose + (f" [expected winner: {i.expected_winner}; audit table in the file's header]"
                           if i.expected_winner else "")) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1] for r in rows)
