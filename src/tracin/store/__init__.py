"""The feature store: role 4 of the data flow (layout in DESIGN.md section 4).

Contract: ``<store>/features/<split>/<checkpoint key>/`` holds the rows of a split in fixed-size
blocks (`block_sizes`), each block's features and exact squared norms written atomically with a
sha256 and read back verified; ``manifest.json`` (a typed `Manifest`) records what the store
was made with (schema `SCHEMA_VERSION`, checked by `check_schema`; a rerun with other
settings is refused by `reconcile`); ``.lock`` names the one writer (`StoreLock`). Only
featurize writes features.

A new store format or block layout goes here.
"""

from tracin._errors import StoreError
from tracin.store._blocks import block_sizes, missing_blocks
from tracin.store._lock import StoreLock
from tracin.store._manifest import Manifest, check_schema, reconcile, task_fingerprint
from tracin.store._store import EMBEDDING, SCHEMA_VERSION, FeatureStore, StorePlan

__all__ = [
    "Manifest",
    "EMBEDDING",
    "FeatureStore",
    "SCHEMA_VERSION",
    "StoreError",
    "StoreLock",
    "StorePlan",
    "block_sizes",
    "check_schema",
    "missing_blocks",
    "reconcile",
    "task_fingerprint",
]
