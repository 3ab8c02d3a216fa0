"""The one error every command shares: something the user can fix, printed without a traceback.

It lives at the bottom of `modelcd/` (beside settings and logs) so that each part's CLI raises it
without importing the shell (`modelcd.cli`), which imports every part's CLI.
"""

from __future__ import annotations


class CliError(Exception):
    """An error the user can fix: printed without a traceback, exit code 2 (or `code`)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code
