"""The one exception type for mistakes a user can fix (bad config value, missing file)."""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """A bad input. The CLI prints its message on one line, without a traceback (unless HYDRA_FULL_ERROR=1)."""


def instantiate_checked(node: Any, key: str, *args: Any) -> Any:
    """``hydra.utils.instantiate(node, _partial_=True)(*args)`` with constructor errors as one-line UserErrors.

    Hydra wraps a constructor's exception in ``InstantiationException``. A UserError inside is passed on as it
    is; a ValueError, whose message starts with the parameter name (``tau=1200 is ...``), is prefixed with the
    config ``key`` so the message names the full key (``mitigation.schedule.tau=1200 is ...``).
    """
    from hydra.utils import instantiate  # start-up: Hydra's instantiate loads where a config is built, not for --help

    try:
        return instantiate(node, _partial_=True)(*args)
    except Exception as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, UserError):
            raise cause from None
        if isinstance(cause, ValueError):
            raise UserError(f"{key}.{cause}") from err
        raise UserError(f"{key} could not be built ({type(cause).__name__}: {cause})") from err
