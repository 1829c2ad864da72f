"""The one exception a user can cause, and how the CLI reports it."""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a file, a row, a flag, a model name).

    The CLI prints the message without a traceback and exits with code 2; nothing is
    written to the output directory before all input has been checked.
    """

    exit_code = 2


def problems_message(header: str, problems: list[str], limit: int = 20) -> str:
    """One message listing up to `limit` problems, with a count of the rest."""
    shown = "\n".join(f"  {p}" for p in problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{header}\n{shown}{more}"
