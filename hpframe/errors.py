"""UserError: the one exception type for a mistake the user can fix (a config key, a path, the machine).

``launch.py`` reports a UserError as one line, ``hpframe: invalid configuration: ...``, and exits with
code 2; every other exception is a bug in hpframe and is reported with its traceback. PlanError (the
planner's refusals) is a UserError. UserError is a ValueError so that callers catching ValueError
keep working; hpframe itself catches UserError only.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable


class UserError(ValueError):
    """A configuration, file or machine the run cannot work with, found before or while it runs.

    ``key`` names the configuration key(s) at fault (comma-separated when several interact);
    ``values`` maps keys and derived quantities to the numbers involved, so callers and tests can
    check them without parsing the message.
    """

    def __init__(self, message: str, *, key: str = "", values: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.values: dict[str, Any] = dict(values or {})


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to ``word``, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
