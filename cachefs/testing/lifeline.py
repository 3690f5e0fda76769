"""Run a server as a child and stop it when the process that started it goes away.

``python -m cachefs.testing.lifeline -- CMD...`` starts CMD in its own process group (the one
``servers.py`` created with ``start_new_session``) and exits with its status. It reads its stdin,
a pipe whose write end only the starting process holds: end of file means that process is gone
(even by SIGKILL), and the server is then stopped too. Without this, a killed test run would leave
servers running with their ports bound.

SIGTERM to the group is ignored here so that the server, which gets it too, can shut down while
this process waits for it; the starting process escalates to SIGKILL on the group if needed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

GRACE_SECONDS = 5.0  # SIGTERM to SIGKILL when the starting process has died


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m cachefs.testing.lifeline -- CMD [ARG...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_default_signals)

    def watch() -> None:
        while os.read(0, 4096):
            pass
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        try:
            child.wait(GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    return child.wait()


def _default_signals() -> None:
    """In the child: undo the SIG_IGN above (ignored signals are inherited across exec)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
