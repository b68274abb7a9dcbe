"""Input errors: what a user gave is wrong, as opposed to a bug.

Every check of a user's input (a params file or setting, a data file, a FLAME file, a checkpoint or
weights file, a command-line flag) raises an :class:`InputError` whose message is one line naming
the file or setting and the problem. A command prints it as ``error: <message>`` and exits with
status 2 (:mod:`dad3dlib.cli`); any other exception is a bug and keeps its traceback.

Each error also derives from the built-in error its checks raised before the family existed, so that
code and tests catching ``ValueError`` or ``FileNotFoundError`` keep working:

    InputError
    ├── InputValueError (ValueError)             a bad value, setting or file content
    │   ├── ParamsError                          a params file or setting
    │   ├── flame.FlameFormatError               a FLAME-format file or directory
    │   ├── benchmark.BenchmarkFormatError       a ground-truth or submission file
    │   └── launch.ClusterError                  the cluster cannot be asked, or refused a setting
    ├── InputFileNotFound (FileNotFoundError)    a file or directory the user named is missing
    │   └── browser.StudyNotFound                no study where a notebook looked
    └── study.StudyBusy                          the study directory is held by another runner

A module with no imports: any module may raise these.
"""
from __future__ import annotations


class InputError(Exception):
    """A user's input is wrong; the message (one line) names the file or setting and the problem."""


class InputValueError(InputError, ValueError):
    """A bad value, setting or file content."""


class InputFileNotFound(InputError, FileNotFoundError):
    """A file or directory the user named (or one its layout requires) is missing."""


class ParamsError(InputValueError):
    """A params file or setting is missing, unreadable or invalid; the message names the file or key."""
