"""Where `from_pretrained` weights come from: a local folder or a Hugging Face hub id, resolved
before any model code runs and without the hub client's network retries.

    src = resolve_pretrained("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", key="model.pretrained",
                             subfolders=("transformer", ""))
    model = PixArtTransformer2DModel.from_pretrained(src.name, **src.kwargs)

Order: a local folder (the config file in the folder itself or in one of `subfolders`); else a hub
id already in the local cache (loaded with `local_files_only=True`: no network at all); else, with
offline mode off, a probe of the hub (`go_offline_if_unreachable`: one request, 3 s at most) and
one quick metadata request (no retries), then the normal download. Offline mode is
`HF_HUB_OFFLINE=1` (the hub client's own switch) or `LCT_OFFLINE=1`; where the probe finds the hub
unreachable, the process switches the hub client to offline mode itself, with one line saying so,
so that no library waits on the client's retries (about 25 s per file, a minute per model). Every
failure is a `UserError` of one line naming the config key to set.
"""

from __future__ import annotations

import os
import re
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lct.errors import UserError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_offline() -> bool:
    """`HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` / `LCT_OFFLINE` set to a true value (read now, not
    at import time, so a test or a launcher can set it late)."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LCT_OFFLINE"))


_PROBE: dict[str, bool] = {}  # endpoint -> reachable, probed once per process
PROBE_TIMEOUT_S = 3.0


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub's endpoint (through the environment's proxies), once per
    process: any HTTP answer counts as reachable; no answer within `timeout` does not."""
    url = hub_endpoint()
    if url not in _PROBE:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            _PROBE[url] = True
        except urllib.error.HTTPError:
            _PROBE[url] = True  # it answered
        except (OSError, ValueError):  # URLError, timeouts, refused connections, a malformed HF_ENDPOINT
            _PROBE[url] = False
    return _PROBE[url]


def set_offline() -> None:
    """Offline mode for this process and its children: the environment (read by libraries at import)
    and the hub client's switch (read at every request, for libraries imported already)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True


def go_offline_if_unreachable() -> bool:
    """True when offline: `HF_HUB_OFFLINE`/`LCT_OFFLINE` set, or the hub did not answer the probe
    (then offline mode is switched on, with one line on stderr)."""
    if is_offline():
        return True
    if hub_reachable():
        return False
    set_offline()
    print(f"note: the Hugging Face hub ({hub_endpoint()}) cannot be reached: offline mode (HF_HUB_OFFLINE=1) "
          "for this process, so only local folders and the local cache are used", file=sys.stderr, flush=True)
    return True


@dataclass
class Pretrained:
    """A resolved source: `name` (local folder or hub id) and the `from_pretrained` kwargs."""

    name: str
    subfolder: str = ""
    local: bool = False          # a local folder (not the hub cache)
    kwargs: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What a manifest or a checkpoint records: an absolute path or the hub id, and the subfolder."""
        return {"id": self.name, "subfolder": self.subfolder or None}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def resolve_pretrained(source: str | os.PathLike, *, key: str, subfolders: Sequence[str] = ("",),
                       config_name: str = "config.json", what: str = "model") -> Pretrained:
    """Resolve `source` (see the module docstring); `subfolders` are tried in order ("" = the
    folder itself) for `config_name`. `key` is the config key named in errors."""
    if source is None or not str(source).strip():
        raise UserError(f"{key}: no {what} given; set it to a local folder written by save_pretrained or a hub id")
    s = str(source).strip()
    path = Path(s).expanduser()
    hint = f"set {key} to a local folder written by save_pretrained (or to a hub id already in the local cache)"
    if path.exists():
        for sub in subfolders:
            if (path / sub / config_name).is_file():
                return Pretrained(str(path.resolve()), sub, True, {"subfolder": sub} if sub else {})
        where = " or ".join(repr(f"{sub}/{config_name}" if sub else config_name) for sub in subfolders)
        raise UserError(f"{key} {s}: no {where} in this folder; {hint}")
    if not _HUB_ID.match(s) or s.startswith((".", "~")):
        raise UserError(f"{key} {s}: no such folder, and not a hub id (owner/name); {hint}")
    from huggingface_hub import try_to_load_from_cache

    for sub in subfolders:
        hit = try_to_load_from_cache(s, f"{sub}/{config_name}" if sub else config_name)
        if isinstance(hit, str):
            kwargs = {"local_files_only": True, **({"subfolder": sub} if sub else {})}
            return Pretrained(s, sub, False, kwargs)
    if go_offline_if_unreachable():
        raise UserError(f"{key} {s}: not in the local Hugging Face cache and the hub is offline "
                        f"(HF_HUB_OFFLINE/LCT_OFFLINE, or unreachable); download it first (`hf download {s}`) or {hint}")
    from huggingface_hub import HfApi

    try:  # one request, no retries: fails fast where the hub is unreachable
        info = HfApi().model_info(s, timeout=10, files_metadata=False)
    except Exception as err:
        raise UserError(f"{key} {s}: the hub could not be reached or has no such repository ({_short(err)}); "
                        f"{hint}") from None
    files = {sib.rfilename for sib in (info.siblings or [])}
    for sub in subfolders:
        if (f"{sub}/{config_name}" if sub else config_name) in files:
            return Pretrained(s, sub, False, {"subfolder": sub} if sub else {})
    where = " or ".join(f"{sub}/{config_name}" if sub else config_name for sub in subfolders)
    raise UserError(f"{key} {s}: the repository has no {where}; {hint}")
