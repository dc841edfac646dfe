"""The errors qstudy reports to a user as one line per problem naming the field or file, and the exit codes they map to."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

# Exit codes of the `qstudy` command line (its --help epilog lists them).
# A trial that ran out of memory is no failure (its config is too large for the machine): a study
# with finished trials beside it exits 0, its summary counting them; with none, 4.
EXIT_OK = 0  # done; a study: at least one trial finished and none failed
EXIT_FAILED = 1  # an unexpected error (a Python traceback), or `caption` could not decode a video
EXIT_BAD_INPUT = 2  # bad input: a config, data or name error, before anything ran
EXIT_TRIALS_FAILED = 3  # a study ran, but some of its trials failed
EXIT_NOTHING_TRAINED = 4  # a study trained nothing: every config over the budget, or no trial finished
EXIT_INTERRUPTED = 130  # Ctrl-C (the shell's code for SIGINT)


REASON_LIMIT = 240  # characters of a failed trial's reason on its one line


def one_line(text: str, limit: int | None = None) -> str:
    """A message as one line (a library's may span several), cut to ``limit`` characters."""
    text = " ".join(text.split())
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def last_exception(traceback_text: str) -> str:
    """The ``Type: message`` a formatted traceback ends with, as one line of at most REASON_LIMIT characters."""
    lines = traceback_text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    rest = lines[starts[-1] + 1:] if starts else lines
    message = next((i for i, line in enumerate(rest) if not line.startswith(" ")), 0)
    return one_line("\n".join(rest[message:]), REASON_LIMIT)


class QstudyError(Exception):
    """Bad input, or a run that cannot train: one line naming the field or file; the CLI prints it and exits 2."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(QstudyError, ValueError):
    """A config file or mapping does not match the schema; the message names the field.

    One error may carry several problems (``problems``), one line each: validation reports all
    it finds in one run instead of one per run.
    """

    def __init__(self, message: str | Iterable[str]):
        problems = (message,) if isinstance(message, str) else tuple(message)
        super().__init__("\n".join(problems))
        self.problems = problems

    def prefixed(self, prefix: str) -> "ConfigError":
        """The same problems, each starting with ``prefix`` (unless it already does)."""
        return ConfigError(problem if problem.startswith(prefix) else f"{prefix}{problem}" for problem in self.problems)


class NothingToTrain(QstudyError):
    """A study that cannot train any config (e.g. every one is over the parameter budget), known before it starts."""

    exit_code = EXIT_NOTHING_TRAINED


class Problems:
    """Collects the problems of several checks, so one :class:`ConfigError` reports them all.

    >>> problems = Problems()
    >>> with problems.check("arms.lora."):
    ...     validate_lora()
    >>> problems.raise_any()
    """

    def __init__(self) -> None:
        self.items: list[str] = []

    @contextmanager
    def check(self, prefix: str = "") -> Iterator[None]:
        try:
            yield
        except ConfigError as error:
            self.add(*error.prefixed(prefix).problems)

    def add(self, *problems: str) -> None:
        self.items += [problem for problem in problems if problem not in self.items]

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)
