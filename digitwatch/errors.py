"""Domain errors. Each carries the exit code the CLI turns it into."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; systemd's RestartPreventExitStatus lists CONFIG."""

    OK = 0
    SOME_FAILED = 1
    USAGE = 2
    DATA = 65  # EX_DATAERR from sysexits.h
    CONFIG = 78  # EX_CONFIG


def reason(exc: OSError) -> str:
    """An OSError in words for a one-line message: 'Permission denied', not
    "[Errno 13] Permission denied: '/x'" (the caller names the path)."""
    return exc.strerror or exc.__class__.__name__


def describe(exc: OSError) -> str:
    """An OSError with its path: 'Permission denied: /srv/results.csv'."""
    return f"{reason(exc)}: {exc.filename}" if exc.filename else reason(exc)


class DigitwatchError(Exception):
    """Base class; the message is one line meant for a person."""

    exit_code: ExitCode = ExitCode.SOME_FAILED


class DataError(DigitwatchError):
    """A dataset file is missing, truncated or not what it claims to be."""

    exit_code = ExitCode.DATA


class ModelError(DigitwatchError):
    """A model file cannot be loaded or does not have the expected signature.
    Named by the user with --model, so it is a usage error."""

    exit_code = ExitCode.USAGE


class ConfigError(DigitwatchError):
    """The effective configuration is invalid or unsafe."""

    exit_code = ExitCode.CONFIG


class ImageError(DigitwatchError):
    """An input scan cannot be turned into a digit. Subclasses name the reason."""

    code = "bad_image"


class EmptyFileError(ImageError):
    code = "empty_file"


class NotPNGError(ImageError):
    code = "not_png"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class NoInkError(ImageError):
    code = "no_ink"


class RefusedError(ImageError):
    """Not a regular file (a link, FIFO, device) or too large to read."""

    code = "refused"
