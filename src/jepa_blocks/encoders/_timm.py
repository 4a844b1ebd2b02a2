"""Create timm models for the encoders: lazy import, local weight files, fail fast offline.

timm is imported only inside these functions, so ``import jepa_blocks`` does not pay for
it (importing timm imports torchvision's models: about 2 s).

Pretrained weights: with ``pretrained=True`` timm looks for the weights on the Hugging Face
hub (or a URL) and, without a network, retries for about a minute before it fails.
:func:`create_timm_model` first works out where the weights would come from; when that
is remote and the host is unreachable (a TCP connection within
``PROBE_TIMEOUT_S`` seconds, through the proxy if one is set) or ``HF_HUB_OFFLINE`` is
set, it loads a copy from the local cache (Hugging Face or ``torch.hub``) if there is
one and otherwise raises ``ConnectionError`` at once.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from jepa_blocks._checks import check_bool

__all__ = ["PROBE_TIMEOUT_S", "create_timm_model", "hub_reachable"]

#: Seconds to wait for a TCP connection to the weights' host before calling it unreachable.
PROBE_TIMEOUT_S = 3.0

_TRUE = {"1", "on", "yes", "true"}
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # what timm looks for, in order


def hub_reachable(url: str, *, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` s.

    Name resolution runs in the same daemon thread, so a hanging DNS lookup is cut off
    at ``timeout`` too.

    Args:
        url: ``http(s)://host[:port]/...``.
        timeout: Seconds to wait, > 0.

    Returns:
        ``True`` if the connection opened.
    """
    parts = urllib.parse.urlsplit(url)
    host, scheme = parts.hostname, parts.scheme or "https"
    if not host:
        return False
    port = parts.port or (443 if scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if proxy_parts.hostname:
            host, port = proxy_parts.hostname, proxy_parts.port or 80
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hf_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or when huggingface_hub loaded."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hf_cached(repo_id: str, filenames: list[str]) -> str | None:
    """Path of the first of ``filenames`` in the local Hugging Face cache of ``repo_id``."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _url_cached(url: str) -> str | None:
    """Path of ``url``'s file in the ``torch.hub`` checkpoint cache, if it is there."""
    name = os.path.basename(urllib.parse.urlsplit(url).path)
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    return path if name and os.path.isfile(path) else None


class _Remote(NamedTuple):
    """Where remote pretrained weights come from, and a cached copy if there is one."""

    what: str  # for messages
    url: str  # the host probed
    hf: bool  # on the Hugging Face hub (HF_HUB_OFFLINE applies)
    cached: str | None  # a local file with the weights, "hf-cache" (hf-hub: names) or None


def _weights_source(name: str, overlay: Mapping[str, Any]) -> _Remote | None:
    """Where ``name``'s pretrained weights come from, or ``None`` if local or unknown."""
    import timm.models

    if name.startswith("hf-hub:"):
        cfg: dict[str, Any] = {"hf_hub_id": name[len("hf-hub:") :].split("@")[0]}
    else:
        try:
            base = timm.models.get_pretrained_cfg(name)
        except RuntimeError as err:  # an unknown pretrained tag
            raise ValueError(f"name {name!r}: {err}") from err
        cfg = {} if base is None else dict(base.to_dict())
    cfg.update(overlay)
    if cfg.get("file") or cfg.get("state_dict") is not None:
        return None
    hf_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if hf_id:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        weights = _hf_cached(hf_id, [f for f in (cfg.get("hf_hub_filename"), *_HF_WEIGHTS) if f])
        if name.startswith("hf-hub:"):  # timm reads the model's config.json from the hub too
            weights = "hf-cache" if weights and _hf_cached(hf_id, ["config.json"]) else None
        return _Remote(f"'{hf_id}' on the Hugging Face hub", f"{endpoint}/{hf_id}", True, weights)
    if url:
        return _Remote(f"'{url}'", url, False, _url_cached(url))
    return None  # no pretrained source: timm says so


def _resolve_offline(name: str, overlay: dict[str, Any]) -> dict[str, Any]:
    """The overlay to create ``name`` with: a cached file when the weights' host is unreachable.

    Raises:
        ConnectionError: If the weights are remote, unreachable and not cached.
    """
    source = _weights_source(name, overlay)
    if source is None:
        return overlay
    if source.hf and _hf_offline():
        reason = "HF_HUB_OFFLINE is set"
    elif not hub_reachable(source.url):
        host = urllib.parse.urlsplit(source.url).hostname
        reason = f"{host} cannot be reached (no connection within {PROBE_TIMEOUT_S} s)"
    else:
        return overlay
    if source.cached is None:
        raise ConnectionError(
            f"pretrained=True needs the weights of timm model {name!r} from {source.what}, but {reason} "
            "and they are not in the local cache. Download them once with network access (they are "
            "cached), or pass checkpoint_path= a local state dict of this architecture, or "
            "pretrained_cfg_overlay=dict(file=...) a local file in the format timm downloads."
        )
    if source.cached == "hf-cache":  # an hf-hub: name: timm reads its config and weights from the cache
        if _hf_offline():
            return overlay
        raise ConnectionError(
            f"pretrained=True needs timm model {name!r} from {source.what}, but {reason}; it is in the "
            "local cache: set HF_HUB_OFFLINE=1 to load it from there."
        )
    return {**overlay, "file": source.cached}


def create_timm_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(name, ...)`` with a local-file option and a fast offline failure.

    Args:
        name: A timm model name (``"vit_small_patch16_224"``, with an optional pretrained
            tag ``".augreg_in21k"``, or ``"hf-hub:org/repo"``).
        pretrained: Load timm's pretrained weights (from the cache, else downloaded).
        checkpoint_path: A local state dict of this architecture (any format timm's
            ``load_state_dict`` reads: ``.pth``/``.pt``/``.bin``/``.safetensors``, a
            ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper, ``module.`` prefixes),
            loaded after creation. Keys the model lacks (a classifier head) are ignored;
            every parameter of the model must be in the file with its shape.
        pretrained_cfg_overlay: timm's ``pretrained_cfg_overlay`` (e.g. ``dict(file=path)``
            loads a local file through timm's own converter for the model).
        **timm_kwargs (Any): Other ``timm.create_model`` arguments (``img_size``,
            ``num_classes``, ...).

    Returns:
        The timm model, in training mode.

    Raises:
        TypeError: ``name`` is not a string, or an argument has the wrong type.
        ValueError: Unknown model name; ``checkpoint_path`` missing, combined with
            ``pretrained=True``, or not matching the architecture.
        ConnectionError: ``pretrained=True``, the weights are remote, the host cannot be
            reached (or ``HF_HUB_OFFLINE`` is set) and they are not cached.
    """
    import timm
    import timm.models

    if not isinstance(name, str):
        raise TypeError(f"name must be a timm model name string, got {type(name).__name__} {name!r}")
    pretrained = check_bool("pretrained", pretrained)
    if pretrained_cfg_overlay is None:
        overlay: dict[str, Any] = {}
    elif isinstance(pretrained_cfg_overlay, Mapping):
        overlay = dict(pretrained_cfg_overlay)
    else:
        raise TypeError(f"pretrained_cfg_overlay must be a dict or None, got {type(pretrained_cfg_overlay).__name__}")
    path = None
    if checkpoint_path is not None:
        if not isinstance(checkpoint_path, (str, os.PathLike)):
            raise TypeError(f"checkpoint_path must be a path, got {type(checkpoint_path).__name__}")
        path = Path(checkpoint_path)
        if not path.is_file():
            raise ValueError(f"checkpoint_path '{path}' is not a file")
        if pretrained:
            raise ValueError("pass either pretrained=True or checkpoint_path=, not both (the file would replace the weights)")
    if not name.startswith(("hf-hub:", "local-dir:")) and not timm.models.is_model(name.split(".")[0]):
        raise ValueError(f"name {name!r} is not a timm model (see timm.list_models())")
    if pretrained:
        overlay = _resolve_offline(name, overlay)
    try:
        model = timm.create_model(
            name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **timm_kwargs
        )
    except RuntimeError as err:  # e.g. an unknown pretrained tag
        raise ValueError(f"timm could not create {name!r}: {err}") from err
    if path is not None:
        state = timm.models.load_state_dict(str(path))
        own = model.state_dict()
        missing = [k for k in own if k not in state]
        wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                 if k in state and state[k].shape != v.shape]
        if missing or wrong:
            raise ValueError(
                f"checkpoint_path '{path}' does not fit timm model {name!r} "
                f"(missing {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                f"shape file vs model {wrong[:5]}{' ...' if len(wrong) > 5 else ''})"
            )
        model.load_state_dict({k: state[k] for k in own})
    return model
