"""One entry point for every dataset: ``load_dataset(name, data_dir)``.

With ``data_dir`` the files there are used (the layout is recognised from the file names,
also one level down in ``data_dir/<name>``). Without it, a downloadable dataset is taken from
the cache (``~/.cache/fedrec/datasets`` or ``$FEDREC_CACHE_DIR/datasets``) or downloaded into
it (ml-100k, ml-1m and ml-latest-small; the larger archives are fetched by hand).
``synthetic`` is generated in memory by :mod:`shared.data.synthetic`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

from shared.data.cleaning import DEFAULT_MIN_USER_INTERACTIONS, CleaningReport, LoadedDataset
from shared.data.dataset import RecDataset
from shared.data.download import (
    ARCHIVES,
    MANUAL_ARCHIVES,
    cached_dataset_dir,
    download_dataset,
    resolve_cache_dir,
)
from shared.data.generic import load_generic
from shared.data.movielens import load_ml1m, load_ml100k, load_ml_latest
from shared.errors import ConfigError, DataError, DatasetNotFoundError
from shared.io import home_path

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = (
    "ml-100k",
    "ml-1m",
    "ml-latest-small",
    "ml-latest",
    "ml-25m",
    "generic",
    "synthetic",
)
"""Every name :func:`load_dataset` accepts."""

LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    "ml-100k": ("u.data", "u.item"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-latest": ("ratings.csv", "movies.csv"),
    "generic": ("interactions.csv", "items.csv"),
}
"""The files that identify each on-disk layout."""

_LAYOUT_OF: dict[str, str] = {
    "ml-100k": "ml-100k",
    "ml-1m": "ml-1m",
    "ml-latest-small": "ml-latest",
    "ml-latest": "ml-latest",
    "ml-25m": "ml-latest",
    "generic": "generic",
}


class _Loader(Protocol):
    def __call__(
        self, data_dir: str | Path, *, name: str, min_user_interactions: int
    ) -> LoadedDataset: ...


_LOADERS: dict[str, _Loader] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-latest": load_ml_latest,
    "generic": load_generic,
}


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
    download: bool = True,
    synthetic_seed: int = 42,
    synthetic_users: int | None = None,
    synthetic_items: int | None = None,
) -> RecDataset:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`), cleaned and in dense ids. The
    synthetic world is generated from ``synthetic_seed`` at its default size, or with
    ``synthetic_users`` users and ``synthetic_items`` items."""
    return load_dataset_with_report(
        name,
        data_dir,
        cache_dir=cache_dir,
        min_user_interactions=min_user_interactions,
        download=download,
        synthetic_seed=synthetic_seed,
        synthetic_users=synthetic_users,
        synthetic_items=synthetic_items,
    ).dataset


def dataset_key(name: str) -> str:
    """The registry's name of dataset ``name`` (any case, spaces around it ignored), or a
    :class:`DataError` listing the valid ones. Compare this, never the name as typed:
    ``Synthetic`` is the synthetic world too."""
    key = name.strip().lower()
    if key not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def check_no_data_dir(name: str, data_dir: str | Path | None) -> None:
    """Refuse a data folder for the generated synthetic world: the user meant a dataset
    that reads it, and figures computed on the synthetic world instead could be taken for
    that dataset's."""
    if name.strip().lower() == "synthetic" and data_dir is not None and str(data_dir):
        raise ConfigError(
            f"data-dir {str(data_dir)!r} is given but the dataset is 'synthetic', which is "
            "generated and reads no files; add --dataset (e.g. ml-100k) for that folder"
        )


def load_dataset_with_report(
    name: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    min_user_interactions: int = DEFAULT_MIN_USER_INTERACTIONS,
    download: bool = True,
    synthetic_seed: int = 42,
    synthetic_users: int | None = None,
    synthetic_items: int | None = None,
) -> LoadedDataset:
    """Like :func:`load_dataset`, also returning the :class:`CleaningReport` to show users."""
    key = dataset_key(name)
    if key == "synthetic":
        check_no_data_dir(key, data_dir)
        return _load_synthetic(synthetic_seed, synthetic_users, synthetic_items)
    folder = dataset_dir(key, data_dir, cache_dir=cache_dir, download=download)
    loader = _LOADERS[_LAYOUT_OF[key]]
    return loader(folder, name=key, min_user_interactions=min_user_interactions)


def dataset_dir(
    name: str,
    data_dir: str | Path | None = None,
    *,
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> Path:
    """The folder holding ``name``'s files: ``data_dir``, the cache, or a fresh download."""
    if data_dir is not None:
        return _find_layout(name, home_path(data_dir))
    cached = cached_dataset_dir(name, cache_dir)
    if cached is not None:
        found = _holds_layout(name, cached)
        if found is None:
            raise DatasetNotFoundError(
                f"{name}: the cached copy {cached} is incomplete (it "
                f"{_missing_files(name, cached)}); delete that folder to download the dataset "
                "again, or pass --data-dir PATH to a complete copy"
            )
        return found
    if name in ARCHIVES and download:
        return _find_layout(name, download_dataset(name, cache_dir))
    raise DatasetNotFoundError(_not_found_message(name, resolve_cache_dir(cache_dir), download))


def detect_layout(directory: str | Path) -> str | None:
    """The layout (``ml-100k``, ``ml-1m``, ``ml-latest``, ``generic``) whose files are in
    ``directory``, or ``None``; when several match, the first in :data:`LAYOUT_FILES`."""
    root = Path(directory)
    for layout, files in LAYOUT_FILES.items():
        if all((root / f).is_file() for f in files):
            return layout
    return None


def _find_layout(name: str, root: Path) -> Path:
    """``root`` or ``root/name`` if it holds ``name``'s layout; else explain what is there:
    another layout, unless ``root`` holds some of ``name``'s files (a partial copy beside
    another dataset's), whose missing ones are named."""
    if not root.is_dir():
        download = ", or omit it to download the dataset" if name in ARCHIVES else ""
        raise DatasetNotFoundError(
            f"{name}: data dir {root} does not exist or is not a folder; pass --data-dir PATH "
            f"pointing at the folder with {_files(name)}{download}"
        )
    found = _holds_layout(name, root)
    if found is not None:
        return found
    other = detect_layout(root)
    own = [root / f for f in LAYOUT_FILES[_LAYOUT_OF[name]]]
    if other is not None and not any(p.exists() or p.is_symlink() for p in own):
        raise DataError(
            f"{root} holds the {other} layout ({_files_of(other)}), not {name}'s "
            f"({_files(name)}); choose the matching dataset name"
        )
    present = sorted(p.name for p in root.iterdir())[:10]
    download = ", or omit it to download the dataset" if name in ARCHIVES else ""
    raise DatasetNotFoundError(
        f"{name}: {root} {_missing_files(name, root)} (found: {present or 'nothing'}); pass "
        f"--data-dir PATH pointing at the folder that holds {_files(name)}{download}"
    )


def _holds_layout(name: str, root: Path) -> Path | None:
    """``root`` or ``root/name`` when it holds every file of ``name``'s layout, else None."""
    files = LAYOUT_FILES[_LAYOUT_OF[name]]
    for candidate in (root, root / name):
        if all((candidate / f).is_file() for f in files):
            return candidate
    return None


def _missing_files(name: str, root: Path) -> str:
    """What ``root`` lacks of ``name``'s layout, e.g. "lacks u.item"."""
    paths = [root / f for f in LAYOUT_FILES[_LAYOUT_OF[name]] if not (root / f).is_file()]
    absent = [p.name for p in paths if not p.exists() and not p.is_symlink()]
    parts = [f"lacks {' and '.join(absent)}"] if absent else []
    for path in paths:
        if path.is_symlink() and not path.exists():
            parts.append(f"has {path.name} as a broken link (to {os.readlink(path)})")
        elif path.exists():
            parts.append(f"has {path.name} but it is not a file")
    return "; ".join(parts)


def _not_found_message(name: str, cache: Path, download: bool) -> str:
    """How to get ``name`` when it is neither in the cache nor downloadable now."""
    where = f"not in the cache ({cache / name})"
    if name in ARCHIVES:
        return f"{name}: {where} and downloading is disabled; pass --data-dir PATH or allow it"
    if name in MANUAL_ARCHIVES:
        return (
            f"{name}: {where}; it is too large to download automatically: get "
            f"{MANUAL_ARCHIVES[name]}, unzip it and pass --data-dir PATH"
        )
    return f"{name}: needs --data-dir PATH, a folder with {_files(name)}"


def _files(name: str) -> str:
    return _files_of(_LAYOUT_OF[name])


def _files_of(layout: str) -> str:
    return " and ".join(LAYOUT_FILES[layout])


def _load_synthetic(seed: int, users: int | None, items: int | None) -> LoadedDataset:
    """Generate the synthetic world, of its default size where ``users`` / ``items`` are
    ``None`` (imported lazily: it pulls in the simulator)."""
    from shared.data.synthetic import SyntheticConfig, generate_world

    sizes = {k: v for k, v in (("n_users", users), ("n_items", items)) if v is not None}
    dataset: RecDataset = generate_world(SyntheticConfig(seed=seed, **sizes)).dataset
    return LoadedDataset(dataset, CleaningReport.unfiltered(dataset, f"synthetic (seed={seed})"))
