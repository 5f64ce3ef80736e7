"""Every error moeyard reports to a user, and the exit code each one means. Imports nothing.

An error of these types carries a message that names what is wrong and how to fix it; the
command line prints it as one line (no traceback) and exits with the type's code, and a
launcher that sees every worker exit with the same code passes it on.
"""
from __future__ import annotations

import errno
import sys
from typing import Callable

BAD_INPUT = 2
"""Exit code: the config, data, checkpoint, command line or environment is wrong; fix it and rerun."""
NONFINITE = 3
"""Exit code: training met NaN/inf and stopped with the last good state saved."""
NO_SPACE = 4
"""Exit code: a write failed for lack of disk space; the last complete checkpoint is intact."""
PEER_LOST = 5
"""Exit code: another node stopped answering (crashed, or its link is down); the last checkpoint is intact."""
INTERRUPTED = 130
"""Exit code: stopped at once by Ctrl-C (128 + SIGINT), without saving."""


class MoeyardError(Exception):
    """Base of the errors a user can act on."""

    exit_code = BAD_INPUT


class ConfigError(MoeyardError, ValueError):
    """A configuration value is wrong; the message names the key and the fix."""


class DataError(MoeyardError, ValueError):
    """The data on disk is missing or not what moeyard wrote; the message says what to do."""


class CheckpointError(MoeyardError, RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names it."""


class LaunchError(MoeyardError, RuntimeError):
    """The environment of a worker does not describe a usable launch; the message says how to fix it."""


class DiskFullError(MoeyardError, OSError):
    """A write ran out of disk space; the message says where, how much, and what is still intact."""

    exit_code = NO_SPACE


class PeerLostError(MoeyardError, RuntimeError):
    """A collective lost a peer: the message names the other nodes and how to resume."""

    exit_code = PEER_LOST


class NonFiniteStop(MoeyardError, RuntimeError):
    """Training met NaN/inf and was told to stop; the last good state is checkpointed."""

    exit_code = NONFINITE


def run_reporting(action: Callable[[], int]) -> int:
    """Run a command; an error the user can act on becomes `error: message` on stderr and its exit code."""
    try:
        return action()
    except (MoeyardError, FileExistsError) as err:  # FileExistsError: a tool refused to overwrite its output
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code if isinstance(err, MoeyardError) else BAD_INPUT
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device writing {err.filename or 'a file'}: free space and run the "
              f"same command again", file=sys.stderr)
        return NO_SPACE
    except KeyboardInterrupt:  # a training worker turns the first Ctrl-C into a save; this is a second one
        print("error: stopped at once by Ctrl-C: the work since the last checkpoint was not saved",
              file=sys.stderr)
        return INTERRUPTED


def exit_process(code: int) -> None:
    """End a `python -m moeyard...` process with `code`, skipping the interpreter's teardown: importing torch
    makes it take ~0.6 s, paid by the launcher and by every worker of every launch. Only for the entry
    modules, after their work is done (files closed, process group destroyed); output is flushed first.
    A process that initialised MPI (mpi4py) exits normally: MPI_Finalize runs at teardown, and mpirun
    fails a rank that skips it."""
    import os

    if "mpi4py.MPI" in sys.modules:
        raise SystemExit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def require(condition: bool, message: str) -> None:
    """The check every config section uses: `message` names the key and the fix."""
    if not condition:
        raise ConfigError(message)
