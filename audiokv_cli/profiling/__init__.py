"""Head profiling: word timings, attention capture during decoding, the hit statistic and the profile file."""

from audiokv_cli.profiling.profile_file import (
    HeadProfile,
    ProfileError,
    find_profile,
    load_head_scores,
    load_profile,
    merge_profiles,
    require_profile,
    save_profile,
)

__all__ = [
    "HeadProfile",
    "ProfileError",
    "find_profile",
    "load_head_scores",
    "load_profile",
    "merge_profiles",
    "require_profile",
    "save_profile",
]
