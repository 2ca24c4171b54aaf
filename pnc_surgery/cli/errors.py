"""How the ``pnc-surgery`` command reports errors: one line on stderr and an exit code per kind of error.

Every subcommand goes through :func:`report`, so the same kind of error has the same exit code everywhere. The table
(:data:`EXIT_CODES`) is printed at the end of ``pnc-surgery --help``.
"""

from __future__ import annotations

import json
import sys
import traceback

from ..errors import PatchFormatError, PatchMismatchError, PncError, UnsupportedModelError

__all__ = [
    "CommandError",
    "EXIT_CODES",
    "USAGE",
    "UNUSABLE",
    "NETWORK",
    "MISSING_PACKAGE",
    "INTERNAL",
    "INTERRUPTED",
    "exit_code",
    "report",
]

INTERNAL, USAGE, UNUSABLE, NETWORK, MISSING_PACKAGE, INTERRUPTED = 1, 2, 3, 4, 5, 130

EXIT_CODES = {
    0: "success",
    INTERNAL: "internal error: a bug in pnc_surgery (rerun with --traceback and report it)",
    USAGE: "usage: a wrong argument or input (unknown option, bad JSON, unknown --kwargs or --config key, "
    "a missing or empty data folder, an --out path that exists)",
    UNUSABLE: "a file or model that cannot be used (invalid config.json, broken image, checkpoint that does not fit, "
    "corrupt or unsafe patch, patch that does not fit the target, model that cannot be traced)",
    NETWORK: "the Hugging Face Hub or the network (no connection, timeout, repo not found, offline and not cached)",
    MISSING_PACKAGE: "an optional package is missing (the message names it)",
    INTERRUPTED: "interrupted (Ctrl-C)",
}
"""Exit code -> the kind of error it stands for."""

_NETWORK_MODULES = ("httpx", "httpx2", "requests", "urllib3", "huggingface_hub")


class CommandError(Exception):
    """An error the command line found itself (a bad argument, an existing output), with its exit code."""

    def __init__(self, message: str, code: int = USAGE):
        super().__init__(message)
        self.code = code


def _is_network_error(exc: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if isinstance(exc, (HfHubHTTPError, LocalEntryNotFoundError, ConnectionError, TimeoutError)):
        return True
    return type(exc).__module__.split(".", 1)[0] in _NETWORK_MODULES and not isinstance(exc, PncError)


def _network_cause(exc: BaseException) -> BaseException | None:
    """The network error behind ``exc`` (itself, or the error it was raised from), if any."""
    seen: BaseException | None = exc
    for _ in range(8):  # a chain of `raise ... from ...`, bounded in case of a cycle
        if seen is None or _is_network_error(seen):
            return seen
        seen = seen.__cause__
    return None


def exit_code(exc: BaseException) -> int:
    """The exit code of an error (see :data:`EXIT_CODES`).

    An error raised from a network error is of the network's kind, whichever error the library turned it into;
    except a file missing from a repo that was found: that is a file that cannot be used.
    """
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if isinstance(exc, CommandError):
        return exc.code
    if isinstance(exc, KeyboardInterrupt):
        return INTERRUPTED
    network = _network_cause(exc)
    if network is not None:
        return UNUSABLE if isinstance(network, RemoteEntryNotFoundError) else NETWORK
    if isinstance(exc, (PatchFormatError, PatchMismatchError, UnsupportedModelError)):
        return UNUSABLE
    if isinstance(exc, PncError):
        return UNUSABLE if isinstance(exc.__cause__, OSError) else USAGE  # an input file that cannot be read
    if isinstance(exc, ImportError):
        return MISSING_PACKAGE
    if isinstance(exc, json.JSONDecodeError):
        return USAGE
    if isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError":
        return UNUSABLE
    return INTERNAL


def _one_line(text: str, limit: int = 1000) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[: limit - 15]}... (truncated)"


def report(command: str, exc: BaseException, show_traceback: bool = False) -> int:
    """Print ``exc`` as one line on stderr (the full traceback too when asked) and return its exit code."""
    code = exit_code(exc)
    if show_traceback:
        traceback.print_exception(exc, file=sys.stderr)
    if code == INTERNAL:
        message = f"internal error: {type(exc).__name__}: {exc} (rerun with --traceback and report it)"
    elif code == INTERRUPTED:
        message = "interrupted"
    elif isinstance(exc, json.JSONDecodeError):
        message = f"invalid JSON argument ({exc})"
    elif isinstance(exc, (PncError, CommandError)):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc}"
    print(f"{' '.join(['pnc-surgery', command]).strip()}: error: {_one_line(message)}", file=sys.stderr)
    return code
