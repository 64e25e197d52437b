"""One HTTP session per thread and per process (``app.backends.http.Sessions``): gunicorn forks its
workers from a master that has loaded the app, so a session made there must never be the one a
worker uses, and no backend client may make one before it is used."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
import requests

from app.backends.http import Sessions
from app.payments.settlement import FacilitatorSettler
from app.services import build
from app.settings import Settings

UNREACHABLE = "http://127.0.0.1:9"


def test_a_thread_keeps_its_session_and_other_threads_get_their_own() -> None:
    sessions = Sessions()
    mine = sessions.get()
    theirs: list[requests.Session] = []
    thread = threading.Thread(target=lambda: theirs.extend([sessions.get(), sessions.get()]))
    thread.start()
    thread.join()
    assert sessions.get() is mine
    assert theirs[0] is theirs[1] and theirs[0] is not mine
    assert not mine.trust_env and not theirs[0].trust_env  # proxy variables are not followed


def test_a_session_made_before_a_fork_is_not_used_after_it() -> None:
    sessions = Sessions()
    before = sessions.get()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as a gunicorn worker: report and leave without running pytest's teardown
        after = sessions.get()
        fresh = after is not before and sessions.get() is after
        os.write(write_end, b"fresh" if fresh else b"inherited")
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == b"fresh"
    assert sessions.get() is before  # the parent's own session is untouched


def test_building_the_services_makes_no_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """``build`` runs in the gunicorn master: the RPC client, the model host, the attestor and the
    facilitator settler must not hold a session yet, or every worker would inherit its sockets."""
    made: list[Any] = []
    real_session = requests.Session

    def counted() -> requests.Session:
        made.append(None)
        return real_session()

    monkeypatch.setattr(requests, "Session", counted)
    settings = Settings(
        pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9"
    ).with_overrides(rpc_urls=(UNREACHABLE,), upstream_url=UNREACHABLE, facilitator_url=UNREACHABLE)
    services = build(settings)
    assert isinstance(services.settler, FacilitatorSettler)
    assert made == []
