"""How ``Upstream`` treats a pinned connection whose TLS fails (``app.backends.upstream._request``):
the certificate served now is verified first; one that verifies is used, even when the failure came
on the last try; one that does not ends the call with ``Unattested``. No sockets: the attestor and
its sessions are scripted."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from app.backends.enclave import Admission, AttestationFailed
from app.backends.upstream import Unattested, Upstream, UpstreamFailed
from app.catalog import Model
from app.settings import Settings

MODEL = Model(name="enclave", description="", tee=True, pricing="per_call", price=1, upstream_url="https://e")
SETTINGS = Settings(pay_to="0x" + "22" * 20, relayer_key="0x" + "33" * 32, redis_url="redis://127.0.0.1:9")


@dataclass(frozen=True)
class Pin:
    fingerprint: str


class Answer:
    def __init__(self, status: int) -> None:
        self.status_code = status
        self.headers: dict[str, str] = {}

    def close(self) -> None:
        return None


@dataclass
class Script:
    """What each request does in turn (a status, or an exception to raise), and what ``renewed``
    gives (a pin, or a failure)."""

    steps: list[Any]
    renewals: list[Any]
    pins_used: list[str] = field(default_factory=list)

    def session(self, model: Model, evidence: Pin) -> Any:
        script = self

        class Session:
            def request(self, *args: Any, **kwargs: Any) -> Answer:
                script.pins_used.append(evidence.fingerprint)
                step = script.steps.pop(0)
                if isinstance(step, BaseException):
                    raise step
                return Answer(step)

        return Session()

    def renewed(self, model: Model, seen: Pin) -> Pin:
        result = self.renewals.pop(0)
        if isinstance(result, BaseException):
            raise result
        return result  # type: ignore[no-any-return]


def forward(script: Script) -> tuple[Any, Admission]:
    upstream = Upstream(SETTINGS)
    admission = Admission(script, MODEL, Pin("old"))  # type: ignore[arg-type]
    return upstream.forward("chat", {}, MODEL, admission), admission


def test_a_certificate_renewed_on_the_last_try_is_still_used() -> None:
    script = Script([500, requests.exceptions.SSLError("fingerprint"), 200], [Pin("new")])
    answer, admission = forward(script)
    assert answer.status == 200 and admission.evidence == Pin("new")
    assert script.pins_used == ["old", "old", "new"]


def test_a_certificate_that_does_not_verify_ends_the_call_before_anything_is_sent_to_it() -> None:
    script = Script([requests.exceptions.SSLError("fingerprint")], [AttestationFailed("key_not_bound", "x")])
    with pytest.raises(Unattested) as refused:
        forward(script)
    assert refused.value.status == 503 and refused.value.code == "attestation_failed"
    assert script.pins_used == ["old"]


def test_certificates_that_keep_changing_get_one_spare_try_only() -> None:
    ssl = requests.exceptions.SSLError("fingerprint")
    script = Script([ssl, ssl, ssl, 200], [Pin("a"), Pin("b"), Pin("c")])
    with pytest.raises(UpstreamFailed) as failed:
        forward(script)
    assert not isinstance(failed.value, Unattested) and script.pins_used == ["old", "a", "b"]
