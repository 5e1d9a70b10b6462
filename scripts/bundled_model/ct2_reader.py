"""The CTranslate2 reader lives in the package; the build scripts import it from here by its old name."""

from audiokv_cli.models.ct2 import CT2FormatError, CT2Model, parse_ct2, read_ct2  # noqa: F401
