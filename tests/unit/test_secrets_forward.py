"""The ``forward`` input's ``shared_key`` and ``security.users`` from files that rotate, checked by
the input's real handshake code with a forward-protocol client computing the digests itself
(tests/unit/test_input_forward.py's): a rotated key or password is what the next connection's
handshake needs; a connection made before the swap keeps its session; a users file rotated to
something that is not ``USER PASSWORD`` keeps the last good list, counted and logged."""

from __future__ import annotations

import time
from pathlib import Path

from kubetrail.core import secrets
from tests.unit.source_helpers import running
from tests.unit.test_input_forward import Client, entries, forward_input, numbers
from tests.unit.test_secrets import secret_volume


async def test_rotated_shared_key_and_users_apply_to_the_next_handshake(tmp_path: Path) -> None:
    volume = secret_volume(tmp_path / "fwd", {"key": "key-1\n", "users": "alice pw-a\n"})
    extra = f"    shared_key ${{file:{volume}/key}}\n    security.users ${{file:{volume}/users}}\n"
    async with running(tmp_path, forward_input(extra), ready="started") as run:
        port = run.source.bound_port
        before = await Client.connect(port)
        assert (await before.handshake("key-1", user="alice", password="pw-a"))[1] is True

        secret_volume(volume, {"key": "key-2", "users": "bob pw-b"})
        time.sleep(secrets.CHECK_INTERVAL + 0.05)
        for key, user, password, reason in (
            ("key-1", "bob", "pw-b", "shared_key mismatch"),
            ("key-2", "alice", "pw-a", "username/password mismatch"),
        ):
            old = await Client.connect(port)
            pong = await old.handshake(key, user=user, password=password)
            assert pong[:3] == ["PONG", False, reason]
            assert await old.closed()
        after = await Client.connect(port)
        assert (await after.handshake("key-2", user="bob", password="pw-b"))[1] is True
        await after.send(["a", entries(1, 0), {"chunk": "new"}])
        assert await after.answer() == {"ack": "new"}
        # The connection authenticated before the swap keeps its session.
        await before.send(["a", entries(1, 1), {"chunk": "old"}])
        assert await before.answer() == {"ack": "old"}
        await before.close()

        # A users file rotated to garbage: the last good list stays, the problem is counted.
        secret_volume(volume, {"key": "key-2", "users": "nopassword"})
        time.sleep(secrets.CHECK_INTERVAL + 0.05)
        again = await Client.connect(port)
        assert (await again.handshake("key-2", user="bob", password="pw-b"))[1] is True
        await again.send(["a", entries(1, 2), {"chunk": "again"}])
        assert await again.answer() == {"ack": "again"}
        await again.close()
        await after.close()
        assert sorted(numbers(run)) == [0, 1, 2]
        assert run.metric("kubetrail_errors_total", type="auth_failed") == 2
        assert run.metric("kubetrail_errors_total", type="bad_users") >= 1
        assert run.metric("kubetrail_secret_reloads_total", option="security.users") == 2
