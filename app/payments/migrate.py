"""Applies ``migrations/NNNN_name.py`` in order and records the keyspace version in Redis.

The repository's ``migrations/`` is installed as the package ``app.migrations`` (pyproject.toml: a
wheel, or an editable install); a checkout that is not installed has it as the top-level package
``migrations`` (the repository root is on ``sys.path``). Both are read with ``importlib.resources``.

Each migration's ``up(store)`` (an ``app.backends.store.Store``: one Redis, or every master of a
cluster) must be idempotent; the version is written after it succeeds, so an
interrupted run simply resumes.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from types import ModuleType
from typing import Any

from app.backends.store import Store, as_store
from app.payments.keys import KEYSPACE_KEY
from app.payments.ledger import keyspace_version


def _migrations_package() -> Traversable:
    """The installed ``app.migrations``, else a checkout's top-level ``migrations``."""
    try:
        return importlib.resources.files("app.migrations")
    except ModuleNotFoundError:  # a checkout run without installing it
        return importlib.resources.files("migrations")


MIGRATIONS_DIR = _migrations_package()


@dataclass(frozen=True)
class Migration:
    """One keyspace migration: its number, its name and its file (``NNNN_name.py``)."""

    number: int
    name: str
    path: Traversable

    def load(self) -> ModuleType:
        """The migration's file imported as a module (its code runs now; ``migrate`` then calls its
        ``up(store)``)."""
        with importlib.resources.as_file(self.path) as path:
            spec = importlib.util.spec_from_file_location(f"x402_migration_{self.number:04d}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        return module


NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.py$")


def discover(directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory`` (files named ``NNNN_name.py``), in number order."""
    found = [
        Migration(int(m.group(1)), m.group(2), path)
        for path in directory.iterdir()
        if (m := NAME_RE.match(path.name))
    ]
    return sorted(found, key=lambda m: m.number)


def pending(store_or_client: Store | Any, directory: Traversable = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations numbered above the keyspace version in Redis (all of them when none is stamped)."""
    current = keyspace_version(as_store(store_or_client).client) or 0
    return [m for m in discover(directory) if m.number > current]


def migrate(
    store_or_client: Store | Any, dry_run: bool = False, directory: Traversable = MIGRATIONS_DIR
) -> list[Migration]:
    """Apply what is pending (or only list it with ``dry_run``); returns the migrations concerned.
    ``store_or_client`` is a ``Store`` or a ready client (tests); raises ``redis.RedisError`` when
    a master does not answer (what was applied stays recorded)."""
    store = as_store(store_or_client)
    todo = pending(store, directory)
    if not dry_run:
        for migration in todo:
            migration.load().up(store)
            store.client.set(KEYSPACE_KEY, migration.number)
    return todo
