"""How the command-line entry points end on a user's mistake: one line that names the file, line or key, exit 2.

A missing file, a bad option value or bad data raises OSError or ValueError with such a message; the entry points
(train.py, cli_demo.py, serve.py) print it alone unless `--debug` asks for the traceback. Any other exception is a
bug and keeps its traceback. A run that a signal stopped (after saving) exits 128 + the signal, as a shell reports it.
"""
from __future__ import annotations

import contextlib
import errno
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

USER_ERRORS = (OSError, ValueError)
EXIT_USER_ERROR = 2


class TrainingStopped(Exception):
    """A signal stopped a training run after it saved a checkpoint: later stages must not run."""

    def __init__(self, signum: int, checkpoint: Path):
        self.signum, self.checkpoint = int(signum), checkpoint
        super().__init__(f"stopped by signal {self.signum} after saving {checkpoint}; to go on, run the same command "
                         f"with --resume")


def describe(error: BaseException) -> str:
    """The one line shown for a user error; a full disk is said in words, with the path when known."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {error.filename}' if error.filename else ''}"
    return str(error) or type(error).__name__


@contextlib.contextmanager
def user_errors_exit(debug: bool = False) -> Iterator[None]:
    """Inside: a user error prints `error: ...` on stderr and exits 2 (with `debug`, the traceback instead); a
    stopped run says so and exits 128 + the signal."""
    try:
        yield
    except TrainingStopped as stop:
        print(str(stop), file=sys.stderr)
        raise SystemExit(128 + stop.signum) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves first and raises TrainingStopped)
        print("interrupted", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {describe(e)} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
