"""The one exception type for mistakes a user can fix (bad config value, missing file)."""


class UserError(ValueError):
    """A bad input. The CLI prints its message on one line, without a traceback (unless HYDRA_FULL_ERROR=1)."""
