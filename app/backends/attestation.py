"""Attestation: before a paid call is forwarded to a model host that publishes an attestation
report, check that the report shows the expected launch measurement and is recent.

The catalog names ``attestation_url`` and the expected ``measurement`` (hex). The report is JSON
with at least ``measurement`` (hex) and ``timestamp`` (unix seconds); it is fetched at most once per
``REPORT_TTL`` per process. A host whose report does not match is refused with 503
``attestation_mismatch`` before any payment is taken. What this proves is only as good as what the
host exposes: the proxy checks the report it is served, it cannot verify the hardware's signature
chain unless the host publishes one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import requests

from app.backends.http import Sessions
from app.catalog import Model

REPORT_TTL = 60.0
MEASUREMENT_HEADER = "X-TEE-Measurement"


@dataclass(frozen=True)
class AttestationCheck:
    """One check of a model host's report: the ``expected`` and ``measured`` measurements (lower-case
    hex, no 0x), the report's and the check's times (unix seconds), and why it failed when not ``ok``."""

    model: str
    url: str
    expected: str
    measured: str
    report_time: int
    checked_at: int
    ok: bool
    reason: str = ""

    def public(self) -> dict[str, object]:
        """This check as a plain dict of its fields (what ``GET /v1/attestation/<name>`` shows)."""
        return asdict(self)


class Attestor:
    """Checks model hosts' attestation reports, over one HTTP session per thread and process."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, AttestationCheck]] = {}
        self._lock = threading.Lock()
        self._sessions = Sessions()

    def check(self, model: Model) -> AttestationCheck:
        """The (cached) result of checking this model's host; fetched again after ``REPORT_TTL``
        seconds. Raises nothing: a report that cannot be fetched or read is a failed check."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(model.name)
            if cached and now - cached[0] < REPORT_TTL:
                return cached[1]
        result = self._fetch_and_check(model)
        with self._lock:
            self._cache[model.name] = (now, result)
        return result

    def _fetch_and_check(self, model: Model) -> AttestationCheck:
        checked_at = int(time.time())

        def refused(reason: str, measured: str = "", report_time: int = 0) -> AttestationCheck:
            return AttestationCheck(
                model.name,
                model.attestation_url,
                model.measurement,
                measured,
                report_time,
                checked_at,
                False,
                reason,
            )

        try:
            response = self._sessions.get().get(model.attestation_url, timeout=5)
            response.raise_for_status()
            report = response.json()
        except (requests.RequestException, ValueError):
            return refused("report unavailable")
        if not isinstance(report, dict):
            return refused("report is not a JSON object")
        measured = str(report.get("measurement", "")).lower().removeprefix("0x")
        report_time = report.get("timestamp")
        if not isinstance(report_time, int) or isinstance(report_time, bool):
            return refused("report has no timestamp", measured)
        if measured != model.measurement:
            return refused("measurement differs from the catalog's", measured, report_time)
        if checked_at - report_time > model.attestation_max_age:
            return refused("report is too old", measured, report_time)
        return AttestationCheck(
            model.name, model.attestation_url, model.measurement, measured, report_time, checked_at, True
        )
