"""HTTP sessions for the backend clients (RPC endpoints, model hosts, attestation reports, facilitator).

A ``requests.Session`` holds open connections, and is not safe to share between threads. gunicorn
loads the app in its master (``preload_app``) and forks the workers from it: a session made there
would hand every worker the same sockets, and their answers would interleave. So each client holds a
``Sessions`` and asks it for the session at the moment of a request: one per thread and per
process, made lazily on first use in that thread of that process, never inherited across a fork.
Proxy variables in the environment are ignored (``trust_env`` off): the configured URLs are called.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import requests


class Sessions:
    """One pooled ``requests.Session`` per thread and per process, for one client; ``prepare`` (if
    given) sets each new session up (mounts an adapter, say)."""

    def __init__(self, prepare: Callable[[requests.Session], None] | None = None) -> None:
        self._local = threading.local()
        self._prepare = prepare

    def get(self) -> requests.Session:
        """This thread's session in this process, made now if there is none yet (or only one made
        before a fork, by another process)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None or self._local.pid != os.getpid():
            session = requests.Session()
            session.trust_env = False
            if self._prepare is not None:
                self._prepare(session)
            self._local.session, self._local.pid = session, os.getpid()
        return session
