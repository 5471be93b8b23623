"""Failing fast, with a clear message, when something needs the Hugging Face Hub and it is unreachable."""
from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub cannot be reached within `timeout` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, alternative: str) -> None:
    """Raise at once if `what` would have to be downloaded and the hub is unreachable."""
    if not hub_reachable():
        raise ConnectionError(f"{what} is not a local path and the Hugging Face Hub "
                              f"({HUB_HOST}) is unreachable (offline or HF_HUB_OFFLINE=1); "
                              f"pass {alternative} instead")
