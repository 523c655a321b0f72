"""What following rotating TLS files costs an output (kubetrail/core/tls_files.py).

Three figures per round, rounds alternating with the baseline in the same process:

* ``context()`` within the second (what every HTTP request and stream connect pays), against
  the baseline of handing out a fixed context (what was done before: an attribute read);
* a due check: the stats of the three files (ca, crt, key), once a second at most;
* a rebuild after a rotation (``build_ssl_context``: the system CAs, the CA file, the key pair).

Usage: ``.venv/bin/python bench/bench_tls_reload.py [--rounds 3]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "cluster"))
sys.path.insert(0, str(ROOT))

from kubetrail.sinks.http_base import build_ssl_context, client_tls  # noqa: E402
from localcluster import pki  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    ca = pki.make_ca("bench-ca")
    pki.write_cert(work / "ca.crt", ca.cert)
    pki.issue(ca, "bench-client", client=True).write(work / "tls.crt", work / "tls.key")
    config = {
        "tls": True,
        "tls.ca_file": str(work / "ca.crt"),
        "tls.crt_file": str(work / "tls.crt"),
        "tls.key_file": str(work / "tls.key"),
    }
    tls = client_tls(config)
    fixed = tls.current

    def due_check() -> None:
        tls._checked = 0.0  # make the next call stat the files (as once a second)
        tls.context()

    calls = 1_000_000
    print("round  baseline ns/call  context() ns/call  due check us  rebuild ms")
    for n in range(args.rounds):
        baseline = timeit.timeit(lambda: fixed, number=calls) / calls * 1e9
        within = timeit.timeit(tls.context, number=calls) / calls * 1e9
        check = timeit.timeit(due_check, number=10_000) / 10_000 * 1e6
        rebuild = timeit.timeit(lambda: build_ssl_context(config), number=50) / 50 * 1e3
        print(f"{n:5d}  {baseline:16.0f}  {within:17.0f}  {check:12.1f}  {rebuild:10.1f}")


if __name__ == "__main__":
    main()
