"""The study's notebook kernels: the kernel manager papermill starts them with, and Ctrl-C
(:class:`Interrupt`) reaching them. Used by the study's runner and by a cluster job
(:func:`dad3dlib.launch.run_job`), which stops its notebook the same way at its time limit."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path


class Interrupt:
    """Ctrl-C for a study. While :meth:`handling`, the first SIGINT starts no more runs and
    interrupts the running notebooks' kernels (Lightning stops training at once; the checkpoints
    written so far stay), so that the study ends early and resumable; a second one kills them."""

    def __init__(self):
        self._event, self._lock, self._kernels, self._presses = threading.Event(), threading.Lock(), set(), 0

    def is_set(self) -> bool:
        return self._event.is_set()

    @contextlib.contextmanager
    def handling(self):
        """SIGINT sets this instead of raising KeyboardInterrupt (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:
        self._presses += 1
        if self._presses == 1:
            print("\ninterrupted: starting no more runs, stopping the running notebooks (checkpoints are kept; "
                  "Ctrl-C again kills them)", file=sys.stderr)
        self.set()

    def set(self) -> None:
        """What Ctrl-C does, from code (a job's time limit near, :func:`dad3dlib.launch.run_job`)."""
        self._event.set()
        self.signal_kernels()

    def signal_kernels(self) -> None:
        """SIGINT to the kernels (again: one that was between two cells ignored it), SIGKILL after
        a second Ctrl-C."""
        with self._lock:
            groups = [getattr(km.provisioner, "pgid", None) for km in self._kernels]
        for pgid in filter(None, groups):
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGINT if self._presses < 2 else signal.SIGKILL)

    def notebook_options(self) -> dict:
        """papermill keyword arguments for one notebook whose kernel this reaches once it is ready
        (kernels run in a session of their own, out of reach of the terminal's Ctrl-C)."""
        interrupt, started = self, []

        class KernelManager(ipc_kernel_manager()):
            async def start_kernel(self, **kw):
                await super().start_kernel(**kw)
                started.append(self)

            async def shutdown_kernel(self, now: bool = False, restart: bool = False):
                with interrupt._lock:
                    interrupt._kernels.discard(self)
                await super().shutdown_kernel(now=now, restart=restart)

        def ready(**_) -> None:
            with interrupt._lock:
                interrupt._kernels.update(started)

        return {"kernel_manager_class": KernelManager, "on_notebook_start": ready}


def ipc_kernel_manager():
    """The kernel manager class of the study's notebooks: kernels talk to papermill over Unix
    sockets instead of plain-text TCP on localhost, each kernel under a name of its own in Jupyter's
    runtime directory (created owner-only), so that concurrent kernels never share a socket."""
    import uuid

    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.paths import jupyter_runtime_dir
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self) -> str:
            return "ipc"

        @default("ip")
        def _ip_default(self) -> str:
            runtime = Path(jupyter_runtime_dir())
            runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
            return str(runtime / f"dad3d-{uuid.uuid4().hex[:16]}-ipc")

    return IPCKernelManager
