"""Models and data sets by Hugging Face hub name, failing fast with one line that says what to do.

Without network, ``from_pretrained`` and ``load_dataset`` retry for tens of seconds and then raise a
connection error that does not say a mistyped local path was meant, nor how to run offline. Here:

- ``model_source``: an existing folder is used as it is (it must hold ``config.json``); a name that
  cannot be a hub repository (``runs/tiny/modle``, ``./model``) is a "folder not found" at once; a hub
  name is looked up in the local cache when the hub cannot be reached (one quick probe of the endpoint).
- ``load_dataset``: ``datasets.load_dataset`` by hub name; when the hub cannot be reached (or the
  offline cache lacks the data set) the error names the config key to point at local files instead.
"""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROBE_TIMEOUT_S = 5.0


def offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE`` or
    ``TRANSFORMERS_OFFLINE`` set to 1 / true / yes / on)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def endpoint() -> str:
    """The hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.lru_cache(maxsize=8)
def _probe(url: str) -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None                                      # the server answered: it is reachable
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def unreachable() -> str | None:
    """Why the hub cannot be reached (one HEAD request, proxies honoured, cached per endpoint), or None."""
    return _probe(endpoint())


def model_source(name_or_path: str | Path) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should load a model from, and the keyword arguments it needs.

    Args:
        name_or_path: a folder written by ``save_pretrained`` or a hub name.

    Returns:
        ``(name_or_path, kwargs)``; ``kwargs`` is ``{"local_files_only": True}`` for a hub name served from
        the local cache because the hub cannot be reached.

    Raises:
        FileNotFoundError: a folder that does not exist (and cannot be a hub name), a folder without
            ``config.json``, or a hub name that is neither reachable nor cached.
    """
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json: give a folder written by "
                                    "save_pretrained (e.g. the model/ folder of a train.align run)")
        return str(path), {}
    if path.exists():
        raise FileNotFoundError(f"model {path} is a file: give the folder that holds config.json")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"model folder {name} not found") from None
    reason = "offline mode is set" if offline() else unreachable()
    if reason is None:
        return name, {}
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name, {"local_files_only": True}
    raise FileNotFoundError(f"model {name!r}: no local folder of that name, and no copy in the Hugging Face cache "
                            f"while the hub ({endpoint()}) cannot be used ({reason}); check the path, or download "
                            "the model where there is network and copy ~/.cache/huggingface here")


def load_dataset(name: str, config: str | None = None, *, split: str, what: str, example: str | None = None,
                 **kwargs: Any):
    """``datasets.load_dataset(name, config, split=split, **kwargs)``, failing fast without network.

    Args:
        name: a hub data set (``xnli``), a packaged builder with ``data_files`` (``json``) or a local folder.
        config, split, kwargs: passed on.
        what: the config key that named the data set, for the message (``data.test``).
        example: how to give local files instead, for the message (default ``--WHAT /data/FILE``).

    Raises:
        ConnectionError: one line naming ``what`` when the hub cannot be reached (or, in offline mode,
            the data set is not in the cache): point ``what`` at local files instead.
    """
    import datasets

    from_hub = not Path(name).exists() and "data_files" not in kwargs and "data_dir" not in kwargs
    advice = (f"point {what} (and any other key that names a hub data set) at local files instead (e.g. "
              f"{example or '--' + what + ' /data/FILE'}; the README lists the formats), or download it where "
              "there is network and copy ~/.cache/huggingface here")
    if from_hub and not offline():
        reason = unreachable()
        if reason is not None:
            raise ConnectionError(f"{what}: {name!r} is a data set on the Hugging Face hub, which cannot be reached "
                                  f"({endpoint()}: {reason}); {advice}")
    try:
        return datasets.load_dataset(name, config, split=split, **kwargs)
    except OSError as exc:
        if not (from_hub and offline()):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConnectionError(f"{what}: {name!r} is not in the local Hugging Face cache (offline mode: {first}); "
                              f"{advice}") from None
