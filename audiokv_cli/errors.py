"""The one exception type whose message is shown to users as a single line."""


class AudiokvError(Exception):
    """A problem the user can fix (bad input, missing weights, wrong profile). The CLI prints it without a traceback."""


class AudiokvWarning(UserWarning):
    """Something about the user's input or settings the run goes on with (a truncated file, a budget that merges past
    what transcripts survive). The CLI prints it as one line."""
