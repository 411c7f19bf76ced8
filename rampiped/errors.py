"""Exit statuses and the exceptions that carry them.

`main()` of each command is the one place that turns one of these into a message and an exit
status (DESIGN.md §5): 0 ok, 1 failure, 2 usage, 3 daemon not running, 78 invalid configuration.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; the unit's RestartPreventExitStatus


class RampipeError(Exception):
    """An error a person can act on: the message says what happened and what to do."""

    exit_code = EXIT_FAILURE


class UsageError(RampipeError):
    exit_code = EXIT_USAGE


class NotRunning(RampipeError):
    exit_code = EXIT_NOT_RUNNING


class InvalidConfig(RampipeError):
    exit_code = EXIT_CONFIG
