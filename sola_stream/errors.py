"""Errors shown to users as one line (the CLI prints them without a traceback)."""


class SolaError(Exception):
    """Base class: a problem the user can fix; the message names what and where."""

    exit_code = 2


class InputError(SolaError):
    """Bad model, calibration data, or options."""


class OutputError(SolaError):
    """The output directory cannot be written as asked."""
