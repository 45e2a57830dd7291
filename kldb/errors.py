"""The errors kldb raises for input it refuses, and the exit status a command line gives each kind of error.

Every check of an argument, option or path that a user gives raises a :class:`KLDBInputError` (a ``ValueError``)
whose message names the argument and the bad value. The ``kldb`` command and ``python -m kldb.hub_cli`` report these,
and the ``ValueError`` s of the pipeline's and ``huggingface_hub``'s own argument checks, as usage errors (exit 2); an
``OSError`` that is not about a path the user named (a model that cannot be read, a full disk, a world that is not
trained yet) as a failure (exit 1). A ``TypeError`` that is not a :class:`KLDBInputTypeError` is a bug: it is not
caught, so its traceback shows where it happened.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class KLDBInputError(ValueError):
    """A value that kldb refuses; the message names the argument and the value."""


class KLDBInputTypeError(KLDBInputError, TypeError):
    """An argument of the wrong type (also a ``TypeError``, Python's convention for that)."""


class KLDBPathError(KLDBInputError, FileNotFoundError):
    """A path the user named that is missing or of the wrong kind (also a ``FileNotFoundError``)."""


class MissingExtraError(ImportError):
    """A command needs optional modules that the base install leaves out; the message names the extra."""


def run_command(prog: str, command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """Run ``command`` and turn the errors it raises into one line on stderr and an exit status (module docstring).

    Args:
        prog: what the line starts with, e.g. ``"kldb sweep"`` gives ``"kldb sweep: error: <message>"``.
        command: the work; returns the exit status of a success (0).
        interrupted: what to say after Ctrl-C (exit 130).

    Returns:
        ``command()``'s status, :data:`EXIT_USAGE` for refused input (``ValueError``, :class:`KLDBInputError` and
        its variants) or a missing optional module, :data:`EXIT_FAILURE` for any other ``OSError``,
        :data:`EXIT_INTERRUPTED` after Ctrl-C. Other exceptions propagate.
    """
    try:
        return command()
    except (ValueError, KLDBInputError, ImportError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        # a model that cannot be read or downloaded, a folder that cannot be written; a full disk says what to do
        message = error.strerror if error.errno == errno.ENOSPC and error.strerror else error
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
