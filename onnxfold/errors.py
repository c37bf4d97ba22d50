"""Errors and the logger shared by every stage.

UserError: bad input or usage, worded in library terms (exit 2 in the CLI); ConfigError names the
configuration field, which the CLI words as its flag.
RuleBug: an op rule raised where it should have declined: a defect in onnxfold, never a property of
the model (see groups.discover)."""

import logging

log = logging.getLogger("onnxfold")


class UserError(Exception):
    """Bad input or usage: the message says what is wrong and how to fix it."""


class WordedError(UserError):
    """A UserError whose `template` names fields as {name}: str() names them as they are (data,
    no_validate), words(as_flags=True) as the command line's flags (--data, --no-validate)."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.words())

    def words(self, as_flags: bool = False) -> str:
        """The message, naming fields as flags or as they are."""
        return worded(self.template, as_flags)


def worded(template: str, as_flags: bool = False) -> str:
    """`template` with each {field} named as it is (multiple_of) or as a flag (--multiple-of)."""
    return template.format_map(_FieldNames(as_flags))


class ConfigError(WordedError):
    """A choice the fold cannot take. `field` names it (a FoldConfig field such as `ratio`, or
    `calib` / `data` / `output` of fold_file), `value` is what was given (None: missing, or a
    switch), and `problem` may name other fields as {name}. str() words it for library users
    (`ratio=1.5 is outside ...`), words(as_flags=True) for the command line (`--ratio 1.5 is
    outside ...`)."""

    def __init__(self, field: str, value, problem: str):
        self.field, self.value, self.problem = field, value, problem
        UserError.__init__(self, self.words())

    def words(self, as_flags: bool = False) -> str:
        """The message, naming fields as flags (--multiple-of) or as they are (multiple_of)."""
        shown = (
            ""
            if self.value is None or self.value is True
            else (f" {self.value}" if as_flags else f"={self.value!r}")
        )
        names = _FieldNames(as_flags)
        return f"{names[self.field]}{shown} {self.problem.format_map(names)}"


class _FieldNames(dict):
    """{name} in a ConfigError's problem -> the field's name, or its flag (--dir-size)."""

    def __init__(self, as_flags: bool):
        super().__init__()
        self.as_flags = as_flags

    def __missing__(self, field: str) -> str:
        return "--" + field.replace("_", "-") if self.as_flags else field


def literal(text: str) -> str:
    """`text` (an onnxruntime message, a tensor name) safe inside a ConfigError problem."""
    return text.replace("{", "{{").replace("}", "}}")


class RuleBug(RuntimeError):
    """An op rule raised an exception instead of declining with a reason: a bug to report."""
