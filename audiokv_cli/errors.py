"""The one exception type whose message is shown to users as a single line."""


class AudiokvError(Exception):
    """A problem the user can fix (bad input, missing weights, wrong profile). The CLI prints it without a traceback."""
