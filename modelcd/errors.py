"""The errors every command shares: something the user can fix, printed without a traceback.

Exit codes, the same for every `modelcd` command (README, "Exit codes"):
- 0: done;
- 1: refused or failed: the system said no (a package that does not verify, a 4xx from the API,
  a deployment that failed, a rollout that is not there) or the work did not succeed;
- 2: usage or configuration: a bad flag or argument, a file that is not there, a malformed
  `MODELCD_*` setting, a service or broker that cannot be reached where the settings say, a token
  the API refuses.

It lives at the bottom of `modelcd/` (beside settings and logs) so that each part's CLI raises it
without importing the shell (`modelcd.cli`), which imports every part's CLI.
"""

from __future__ import annotations

OK = 0
FAILED = 1
USAGE = 2


class CliError(Exception):
    """Refused or failed: printed without a traceback, exit code 1 (or `code`)."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class UsageError(CliError):
    """A usage or configuration error (bad argument, missing file, unreachable service): exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=USAGE)
