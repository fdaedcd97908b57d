"""Storage: the database (models, the unit of work, the repository holding every SQL statement) and the
blob stores that keep tensors beside it."""

from .blobs import BlobStore, make_blob_store, new_key
from .database import Database, Duplicate, SchemaNotAtHead, make_engine, migrate, require_schema
from .repository import Repository

__all__ = [
    "BlobStore",
    "Database",
    "Duplicate",
    "Repository",
    "SchemaNotAtHead",
    "make_blob_store",
    "make_engine",
    "migrate",
    "new_key",
    "require_schema",
]
