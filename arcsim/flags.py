"""The command line's argument parser: one-line errors, defaults in the help, ``ARCSIM_*`` fallbacks.

:class:`Parser` is an ``argparse.ArgumentParser`` that

- reports a usage error as one line, ``arcsim: error: ...``, and exits with :data:`USAGE_ERROR` (2);
- shows each option's default in its help (and keeps descriptions and examples as written);
- on a parser made with ``env_fallback=True`` (the service commands), gives every flag an environment
  variable to fall back to: ``ARCSIM_`` + the flag's name upper-cased with dashes as underscores
  (``--metrics-port`` -> ``ARCSIM_METRICS_PORT``), or the name passed as ``env=``. A flag given on the
  command line wins over its variable; an empty variable counts as unset. The variable's value goes
  through the flag's own type and choices; a repeatable flag takes a comma-separated list, a switch
  one of true/false/1/0/yes/no; a bad value is a usage error naming the variable.

Containers configure the services through these variables instead of templated commands.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

USAGE_ERROR = 2
ENV_PREFIX = "ARCSIM_"
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_NO_ENV_ACTIONS = ("help", "version")


class HelpFormatter(argparse.HelpFormatter):
    """Prose paragraphs of descriptions and epilogs wrapped to the terminal; a paragraph with line
    breaks (the examples) kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if "\n" in paragraph:
                paragraphs.append("\n".join(indent + line for line in paragraph.splitlines()))
            else:
                paragraphs.append(
                    textwrap.fill(" ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent)
                )
        return "\n\n".join(paragraphs)


def env_name(flag: str) -> str:
    """The variable of a flag: ``--join-timeout`` -> ``ARCSIM_JOIN_TIMEOUT``."""
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def parse_bool(text: str) -> bool:
    """A switch's value from the environment: true/false, 1/0 or yes/no (any case)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected one of {'/'.join(_TRUE + _FALSE)}")


@dataclass(frozen=True)
class EnvFlag:
    """A flag with an environment fallback; ``default`` and ``required`` are the flag's own, which
    the parser applies itself once it knows the flag was not on the command line."""

    action: argparse.Action
    variable: str
    default: Any
    required: bool
    repeated: bool
    switch: bool


class Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, env_fallback: bool = False, **kwargs: Any) -> None:
        # Set before argparse's __init__, which already calls add_argument (for --help).
        self.env_fallback = env_fallback
        self.env_flags: list[EnvFlag] = []
        self._subcommands: list[argparse.Action] = []
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *names: str, env: str | None = None, **kwargs: Any) -> argparse.Action:
        """``add_argument`` with the default appended to the help; on an ``env_fallback`` parser (or
        with ``env=``), an option also gets its environment variable, shown in the help too."""
        action_name = kwargs.get("action")
        is_option = bool(names) and names[0].startswith("-") and action_name not in _NO_ENV_ACTIONS
        if not is_option or not (self.env_fallback or env is not None):
            action = super().add_argument(*names, **kwargs)
            if is_option:
                _describe(action, action.default, required=action.required)
            return action
        switch = action_name == "store_true"
        default = kwargs.pop("default", False if switch else None)
        required = kwargs.pop("required", False)
        # SUPPRESS: the attribute is set only when the flag is on the command line, which is how
        # parse_known_args tells a flag given from one left to its variable or default.
        action = super().add_argument(*names, default=argparse.SUPPRESS, **kwargs)
        long_flag = next((n for n in names if n.startswith("--")), names[0])
        flag = EnvFlag(
            action=action,
            variable=env or env_name(long_flag),
            default=default,
            required=required,
            repeated=action_name == "append",
            switch=switch,
        )
        self.env_flags.append(flag)
        _describe(action, default, required=required, variable=flag.variable)
        return action

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        self._subcommands.append(action)
        return action

    def env_variables(self) -> frozenset[str]:
        """Every fallback variable of this parser and its subcommands."""
        names = {flag.variable for flag in self.env_flags}
        for action in self._subcommands:
            for parser in action.choices.values():
                names |= parser.env_variables()
        return frozenset(names)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        for flag in self.env_flags:
            dest = flag.action.dest
            if hasattr(namespace, dest):
                continue  # given on the command line: it wins over the variable
            raw = os.environ.get(flag.variable, "")
            if raw.strip():
                setattr(namespace, dest, self._from_env(flag, raw))
            elif flag.required:
                self.error(f"{'/'.join(flag.action.option_strings)} is required (or set {flag.variable})")
            else:
                setattr(namespace, dest, flag.default)
        return namespace, extras

    def _from_env(self, flag: EnvFlag, raw: str) -> Any:
        try:
            if flag.switch:
                return parse_bool(raw)
            if flag.repeated:
                items = [item.strip() for item in raw.split(",") if item.strip()]
                return [self._convert(flag.action, item) for item in items]
            return self._convert(flag.action, raw.strip())
        except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
            self.error(f"{flag.variable}={raw!r}: {error}")

    @staticmethod
    def _convert(action: argparse.Action, text: str) -> Any:
        convert: Callable[[str], Any] = action.type if callable(action.type) else str
        try:
            value = convert(text)
        except ValueError:
            raise ValueError(f"not a valid {getattr(convert, '__name__', 'value')}") from None
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
        return value

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"arcsim: error: {message} (see '{self.prog} --help')\n")


def _describe(action: argparse.Action, default: Any, *, required: bool, variable: str | None = None) -> None:
    """Append the default (and the variable) to an option's help."""
    if action.help == argparse.SUPPRESS:
        return
    notes = []
    if required and variable is not None:
        notes.append("required")
    elif default not in (None, False, argparse.SUPPRESS) and default != []:
        notes.append(f"default: {default}")
    if variable is not None:
        notes.append(f"env {variable}")
    if notes:
        text = "; ".join(notes).replace("%", "%%")  # argparse %-formats help strings
        action.help = f"{action.help} ({text})" if action.help else f"({text})"
