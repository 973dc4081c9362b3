"""CAPI's image data: Parquet shards (``format``), importers, and the training reader (``reader``).

``resolve_dataset`` turns ``DataConfig.dataset`` into a dataset directory, importing a built-in
dataset into the cache on first use.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from capi_core.data.format import MANIFEST, DatasetError, Manifest, load_manifest, verify_dataset
from capi_core.data.importers import import_fashion_mnist

__all__ = ["BUILTIN_DATASETS", "DatasetError", "Manifest", "builtin_dir", "cache_root", "import_builtin",
           "load_manifest", "resolve_dataset", "verify_dataset"]

BUILTIN_DATASETS = {"fashion-mnist": import_fashion_mnist}  # name -> importer(out_dir)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$CAPI_CACHE_DIR``, else ``~/.cache/capi``; datasets live in its ``datasets/``."""
    return Path(cache_dir or os.environ.get("CAPI_CACHE_DIR") or Path.home() / ".cache" / "capi").expanduser()


def builtin_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where built-in dataset ``name`` is (or will be) imported."""
    return cache_root(cache_dir) / "datasets" / name


def resolve_dataset(name_or_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The dataset directory for a built-in name (imported on first use) or a path (manifest validated).

    Several processes may resolve a built-in at once: one imports under a file lock into a temporary
    directory and renames it into place; the others wait and then use it.
    """
    name = str(name_or_path)
    if name in BUILTIN_DATASETS:
        return import_builtin(name, cache_dir)
    path = Path(name).expanduser()
    if path.is_dir():
        load_manifest(path)
        return path.resolve()
    raise DatasetError(f"unknown dataset {name!r}: neither a built-in ({', '.join(BUILTIN_DATASETS)}) "
                       "nor an existing dataset directory")


def import_builtin(name: str, cache_dir: str | Path | None = None, **kwargs) -> Path:
    """Import built-in ``name`` into the cache unless it is there; ``kwargs`` go to its importer.

    Safe to call from several processes at once (file lock, then rename of a finished directory).
    """
    target = builtin_dir(name, cache_dir)
    if not (target / MANIFEST).is_file():
        _import_locked(name, target, **kwargs)
    load_manifest(target)
    return target


def _import_locked(name: str, target: Path, **kwargs) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # flock, unlike an O_EXCL lock file, is released by the kernel if the importing process dies.
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MANIFEST).is_file():  # another process finished while we waited
            return
        for stale in target.parent.glob(f".{name}.*.tmp"):  # left by an import that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = target.parent / f".{name}.{os.getpid()}.tmp"
        try:
            BUILTIN_DATASETS[name](tmp, **kwargs)
            if target.exists():  # a directory without a manifest: not a dataset
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
