"""Files: atomic writes (a file holds either its previous content or the complete new one, never a
truncated mix, whatever stops the writer: a full disk, a kill, a power cut), reads that fail in one
line naming the file, and locks.

    with atomic_open(path) as f:      # a binary file object
        torch.save(obj, f)
    atomic_write(path, text_or_bytes)
    write_json(path, obj)
    read_bytes(path, SomeError, "what")  # one line naming the file when it cannot be read
    except LOAD_ERRORS: ...           # what pickle.load / torch.load raise on a bad file
    with exclusive_lock(path): ...    # one process at a time (``flock``)

Parent directories are created. The one home for writing a file that others read.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import sys
import threading
from pathlib import Path

# What loading a pickle or a torch file (``torch.load``, weights only) raises on bad or missing bytes:
# pickle's own error and the others its documentation names (AttributeError, EOFError, ImportError,
# IndexError), the KeyError, TypeError, ValueError and OverflowError of malformed opcodes, torch.load's
# RuntimeError for a damaged archive, and OSError for a file that cannot be read.
LOAD_ERRORS = (pickle.UnpicklingError, AttributeError, EOFError, ImportError, IndexError, KeyError, TypeError,
               ValueError, OverflowError, RuntimeError, OSError)


@contextlib.contextmanager
def atomic_open(path: str | Path):
    """A binary file object that becomes ``path`` when the block ends without error: written to a
    temporary file next to ``path``, flushed to disk, then renamed over it; on any error the
    temporary file is removed and ``path`` is left as it was. An OSError (e.g. ENOSPC, a full disk)
    is re-raised naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # whatever stops the writer: the temporary file goes, the error is re-raised
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and e.errno is not None:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from e
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (str as UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json(path: str | Path, obj) -> None:
    """``obj`` as indented JSON (non-JSON values as their str), atomically (:func:`atomic_open`)."""
    atomic_write(path, json.dumps(obj, indent=2, default=str))


def write_record(path: Path, obj) -> None:
    """:func:`write_json` for a study runner's own records (provenance.json, error.json): a record that
    cannot be written (a full disk) is one line on stderr, never a crash of the study."""
    try:
        write_json(path, obj)
    except OSError as e:
        print(f"warning: {e.strerror or e} (record not written)", file=sys.stderr)


def read_bytes(path: str | Path, error: type[Exception], what: str = "") -> bytes:
    """The content of ``path``; a file that cannot be read raises ``error`` with one line naming it:
    ``"<path>: cannot read[ <what>] (<reason>)"``. The one home for reading a file a user gave."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read{' ' + what if what else ''} ({e.strerror or e})") from e


@contextlib.contextmanager
def exclusive_lock(path: str | Path, wait: bool = True):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; yields the open
    file (text, read/write). ``wait`` False: raise BlockingIOError at once when another process
    holds it. The system drops the lock when its holder exits, however it exits."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        yield f
