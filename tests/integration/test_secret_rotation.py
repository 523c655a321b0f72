"""Credentials rotated under a running kubetrail, against servers that check them for real.

* **HTTP basic auth**: nginx (Debian's ``nginx-light``, installed by ``scripts/setup``) checks
  ``Authorization`` against an htpasswd file (``auth_basic``, re-read by nginx at each request)
  and passes the authenticated user on as ``X-Remote-User`` to a recorder behind it, so every
  record is counted by the identity that delivered it. The recorder (a stdlib HTTP server in
  this process) only stores bodies: the authentication is nginx's.
* **Kafka SASL/SCRAM**: a one-node cluster of the real broker (``tests/servers/kafka.py``) with
  ``connections.max.reauth.ms`` set, so connections re-authenticate every few seconds
  (KIP-368) and a credential the client still holds is checked again; a second SCRAM user is
  created through the Admin API.

In both, the credentials are files in a Kubernetes-style Secret volume (``..data`` symlink
swap, ``tests/unit/test_secrets.py``), records are delivered exactly once across the
rotations, the old identity is revoked at the server right after the swap, and a wrong
password put in the file stops delivery (proof that the file's new value is what is sent)
until the file is fixed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.kubetrail_proc import KubetrailProcess, wait_for
from tests.integration.rotation import (
    QUICK_RETRIES,
    Nginx,
    Recorder,
    append_lines,
    http_output,
    require_nginx,
    service,
    stops_cleanly,
    tail_input,
)
from tests.unit.test_secrets import secret_volume


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[tuple[int, Recorder, Path]]:
    """nginx with basic auth on a free port in front of a :class:`Recorder`; yields (port,
    recorder, htpasswd path)."""
    require_nginx()
    recorder = Recorder().serve_in_thread()
    work = tmp_path / "nginx"
    work.mkdir()
    htpasswd = work / "htpasswd"
    htpasswd.write_text("alice:{PLAIN}alice-pw\nbob:{PLAIN}bob-pw\n")
    server = Nginx(
        work,
        recorder,
        "$remote_user",
        location=f'auth_basic "kubetrail";\n            auth_basic_user_file {htpasswd};',
    )
    try:
        server.start()
        yield server.port, recorder, htpasswd
    finally:
        server.stop()
        recorder.shutdown()


def test_http_basic_auth_rotates_between_users_exactly_once(tmp_path: Path, gated: tuple[int, Recorder, Path]) -> None:
    port, recorder, htpasswd = gated
    volume = secret_volume(tmp_path / "secret", {"username": "alice", "password": "alice-pw\n"})
    log = tmp_path / "in.log"
    log.touch()
    proc = KubetrailProcess(
        tmp_path / "kt",
        service(*QUICK_RETRIES)
        + tail_input(log, "parser json")
        + http_output(
            port,
            f"http_user ${{file:{volume}/username}}",
            f"http_passwd ${{file:{volume}/password}}",
        ),
    ).start()

    with stops_cleanly(proc):
        append_lines(log, 0, 200)
        wait_for(lambda: recorder.count() >= 200, 60, "the first 200 records as alice")
        # Rotate to bob and revoke alice at the server right away, as an operator would.
        secret_volume(volume, {"username": "bob", "password": "bob-pw"})
        htpasswd.write_text("bob:{PLAIN}bob-pw\n")
        append_lines(log, 200, 200)
        wait_for(lambda: recorder.count() >= 400, 60, "200 more records as bob")
        # A wrong password in the file: nginx refuses it, nothing is delivered, nothing lost.
        secret_volume(volume, {"username": "bob", "password": "not-bob-pw"})
        time.sleep(1.5)
        append_lines(log, 400, 100)
        time.sleep(4)
        assert recorder.count() == 400
        access = (htpasswd.parent / "access.log").read_text()
        assert '"POST /ingest HTTP/1.1" 401' in access
        secret_volume(volume, {"username": "bob", "password": "bob-pw"})
        wait_for(lambda: recorder.count() >= 500, 60, "the held records once the password is right again")
    recorder.assert_rotated_once(500, "alice", "bob")
    output = proc.log()
    assert "credential file changed" in output and "alice-pw" not in output and "bob-pw" not in output
