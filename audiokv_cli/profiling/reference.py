"""Where a `--profile` value points: a local file, or a Hub repository (``hf://OWNER/REPO/FILE`` or ``OWNER/REPO``).

Hub references resolve through huggingface_hub's local cache (downloaded on first use unless HF_HUB_OFFLINE is set), so a
profile is shared like a model: published once, then read from the cache by every run. The file found is checked
against the model's fingerprint exactly like a local one.
"""

from __future__ import annotations

import re
from pathlib import Path

from audiokv_cli.profiling.profile_file import PROFILE_SUFFIX, ProfileError, find_profile

HUB_PREFIX = "hf://"
# OWNER/REPO as the Hub spells repository ids; anything else that does not exist is a missing local file.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_hub_reference(reference: str) -> bool:
    """True for hf://... and for OWNER/REPO that is not a local path."""
    if reference.startswith(HUB_PREFIX):
        return True
    return bool(_REPO_ID.match(reference)) and not reference.endswith(PROFILE_SUFFIX) and not Path(reference).exists()


def _fetch_hint(repo_id: str, filename: str | None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return f"fetch it with `huggingface-cli download {what}` (or unset HF_HUB_OFFLINE)"


def resolve_hub_profile(reference: str) -> Path:
    """The local path of a Hub profile: the file for hf://OWNER/REPO/FILE, the cached snapshot folder for OWNER/REPO
    (the caller picks the profile matching its model there)."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = bool(constants.HF_HUB_OFFLINE)
    if reference.startswith(HUB_PREFIX):
        parts = reference[len(HUB_PREFIX) :].split("/")
        if len(parts) < 3 or not all(parts):
            raise ProfileError(f"{reference}: a Hub profile reference is hf://OWNER/REPO/FILE{PROFILE_SUFFIX}")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        if not filename.endswith(PROFILE_SUFFIX):
            raise ProfileError(f"{reference}: a Hub profile reference names a {PROFILE_SUFFIX} file")
    else:
        repo_id, filename = reference, None
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
        return Path(
            snapshot_download(repo_id, local_files_only=offline, allow_patterns=[f"*{PROFILE_SUFFIX}", "*.json"])
        )
    except HFValidationError as error:
        raise ProfileError(f"{reference}: not a Hub repository id ({str(error).splitlines()[0]})") from None
    except Exception as error:  # huggingface_hub raises many types (offline, missing entry, HTTP); each means "not here"
        if offline:
            raise ProfileError(f"{reference}: not in the local Hugging Face cache; {_fetch_hint(repo_id, filename)}") from None
        raise ProfileError(f"{reference}: cannot fetch from the Hub ({type(error).__name__}: "
                           f"{str(error).splitlines()[0] if str(error) else 'no details'})") from None


def locate_profile(reference: str, adapter) -> Path:
    """The profile file ``reference`` names for ``adapter``; for OWNER/REPO, the repository's best match."""
    check_reference(reference)
    if not is_hub_reference(reference):
        return Path(reference)
    found = resolve_hub_profile(reference)
    if found.is_dir():
        match = find_profile(adapter, found, defaults=False)
        if match is None:
            raise ProfileError(f"{reference}: no profile for {adapter.name} in this repository")
        return match
    return found


def check_reference(reference: str) -> None:
    """Fail before any model loads when a local --profile file is missing (Hub references resolve later)."""
    if not is_hub_reference(reference) and not Path(reference).is_file():
        raise ProfileError(f"{reference}: no such profile file")
