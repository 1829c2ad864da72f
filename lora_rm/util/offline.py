"""Hub access that cannot succeed fails fast, in one line: is the hub switched off (`hub_offline`, the one
place HF_HUB_OFFLINE is read), and can it be reached at all (`require_hub`, a TCP connect bounded to a few
seconds, instead of the libraries' minute of retries)?
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

from lora_rm.errors import UserError

PROBE_SECONDS = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")
_probed: dict[tuple[str, int], str | None] = {}  # (host, port) -> None if reachable, else why not


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (1/on/yes/true, as huggingface_hub reads it) or was set when
    huggingface_hub was imported."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_local(name: str) -> bool:
    """A path that exists, or that is spelled like a path rather than a hub id (`owner/name`)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name


def unreachable_message(name: str, what: str, reason: str = "") -> str:
    """One line: what was asked for, that the hub cannot serve it, and what to do."""
    if hub_offline():
        return (
            f"{name}: no local {what} by that name, and HF_HUB_OFFLINE=1 is set with no cached copy of it; "
            "pass a local path, or unset HF_HUB_OFFLINE to download it once"
        )
    why = f" ({reason})" if reason else ""
    return (
        f"{name}: cannot fetch the {what}: the Hugging Face Hub is unreachable{why}. Pass a local path, "
        "or set HF_HUB_OFFLINE=1 to use a copy already in the cache."
    )


def _endpoint() -> tuple[str, int]:
    """The host and port a hub request would first connect to: the HTTPS proxy when one is set."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    proxy = next(
        (
            os.environ[k]
            for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
            if os.environ.get(k)
        ),
        "",
    )
    if proxy and url.scheme == "https":
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return url.hostname or "", url.port or (443 if url.scheme == "https" else 80)


def _probe(host: str, port: int) -> str | None:
    """None when a TCP connection to host:port opens within PROBE_SECONDS (DNS included), else why not."""
    result: list[str | None] = [f"no answer from {host}:{port} in {PROBE_SECONDS:.0f} s"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            result[0] = None
        except OSError as e:
            result[0] = f"{host}:{port}: {e.strerror or type(e).__name__}"

    worker = threading.Thread(target=connect, daemon=True)  # getaddrinfo has no timeout of its own
    worker.start()
    worker.join(PROBE_SECONDS)
    return result[0]


def require_hub(name: str, what: str) -> None:
    """Raise UserError (one line) when `name` is a hub id and the hub cannot be reached; do nothing for a
    local path or with HF_HUB_OFFLINE set (the libraries then read the cache, quickly)."""
    if is_local(name) or hub_offline():
        return
    host, port = _endpoint()
    if (host, port) not in _probed:
        _probed[(host, port)] = _probe(host, port)
    reason = _probed[(host, port)]
    if reason is not None:
        raise UserError(unreachable_message(name, what, reason))


def model_folder(name: str | Path, what: str = "reward model") -> Path:
    """The local folder of a model: `name` itself when it is a path, else the hub repo `name` (`owner/name`,
    as `--push-to-hub` wrote it) downloaded to, or read from, the Hugging Face cache. Raises UserError in
    seconds when the hub is out of reach (or HF_HUB_OFFLINE=1 and nothing is cached), and for an unknown
    repo."""
    text = str(name)
    if is_local(text) or text.count("/") > 1 or not _looks_like_repo_id(text):
        return Path(name)
    require_hub(text, what)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=text))
    except Exception as e:  # huggingface_hub wraps failures in many exception types
        kind = type(e).__name__
        if "RepositoryNotFound" in kind or "RevisionNotFound" in kind:
            raise UserError(
                f"{text}: not a local folder, and no model repo by that name on the hub"
            ) from None
        if hub_offline() or any(
            k in kind for k in ("LocalEntryNotFound", "Offline", "Connection", "Timeout")
        ):
            raise UserError(unreachable_message(text, what, kind)) from None
        raise UserError(f"{text}: cannot download the {what} ({kind}: {e})") from None


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
