"""``python -m dad3dlib <command>``: a registry of commands, each a module's ``main(argv)``.

Modules are imported only when their command runs, so that a command never pays for (or needs)
another command's dependencies. Bad input ends every command the same way: ``error: <message>``
on one line of stderr and exit status 2. Bad input is an :class:`~dad3dlib.errors.InputError` (every
check of a user's input raises one), or an OSError the system raised (it has an errno: a file that
cannot be read or written, a full disk, a permission), which is the machine's state, not a bug.
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import sys

from .errors import InputError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "make-head": ("dad3dlib.synthetic_head", "write the synthetic FLAME-format head model"),
    "show-head": ("dad3dlib.viz", "render a head model (the synthetic one by default) and variations to a PNG"),
    "make-data": ("dad3dlib.synthetic_data", "render a synthetic DAD-3DHeads-format data set"),
    "show-data": ("dad3dlib.viz", "a grid of data samples with overlays and loader crops"),
    "train": ("dad3dlib.train", "train DAD-3DNet from a params file"),
    "evaluate": ("dad3dlib.evaluate", "evaluate a checkpoint on a data split"),
    "predict": ("dad3dlib.evaluate", "write a DAD-3DHeads submission JSON or NoW challenge meshes"),
    "benchmark": ("dad3dlib.benchmark", "score a submission with the DAD-3DHeads benchmark metrics"),
    "study": ("dad3dlib.study", "run the ablation study (papermill) and build the report"),
}

# Modules that serve several commands expose main_<command> (dashes as underscores).
def _entry(name: str):
    module = importlib.import_module(COMMANDS[name][0])
    return getattr(module, "main_" + name.replace("-", "_"), None) or module.main


def is_input_error(e: BaseException) -> bool:
    """Whether ``e`` reports bad input (or a refusal of the system) rather than a bug."""
    return isinstance(e, InputError) or isinstance(e, OSError) and e.errno is not None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {n:<{width}}  {h}" for n, (_, h) in COMMANDS.items()]
        print("usage: python -m dad3dlib <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command '{argv[0]}'", file=sys.stderr)
            return 2
        return 0
    try:
        return int(_entry(argv[0])(argv[1:]) or 0)
    except (InputError, OSError) as e:
        if not is_input_error(e):
            raise
        print("error: " + " ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
        return 2
