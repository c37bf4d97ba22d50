"""Errors and the logger shared by every stage.

UserError: bad input or usage, worded in library terms (the CLI maps them to its flags and exits 2).
RuleBug: an op rule raised where it should have declined: a defect in onnxfold, never a property of
the model (see groups.discover)."""

import logging

log = logging.getLogger("onnxfold")


class UserError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it."""


class RuleBug(RuntimeError):
    """An op rule raised an exception instead of declining with a reason: a bug to report."""
