"""The ``counter`` output: prints how many records each flush had, as Fluent Bit's ``out_counter``.

Fluent Bit prints one line per flush, ``<time>,<records in this flush> (total = <since start>)``
with the time as ``%f`` (seconds, six decimals), e.g. ``1500484743.123456,1 (total = 1)``; this
is the format its documentation shows and that scripts parse. (Fluent Bit's development branch
switched to a JSON line with ``serialized_events``/``log_records`` counts, which count msgpack
group markers that kubetrail does not have; the documented format is kept.) A batch is one flush.
The line goes to standard output and is flushed at once, so a pipe sees it when the batch is
delivered.
"""

from __future__ import annotations

import sys
import time
from typing import Any, BinaryIO

from kubetrail.core.component import ComponentContext, Sink
from kubetrail.core.record import Batch


class CounterSink(Sink):
    plugin_name = "counter"
    description = "Prints the number of records per flush and in total"
    options = ()

    def __init__(self, ctx: ComponentContext, config: dict[str, Any], stream: BinaryIO | None = None) -> None:
        super().__init__(ctx, config)
        self.stream = stream or sys.stdout.buffer
        self.total = 0

    async def write(self, batch: Batch) -> None:
        count = len(batch)
        self.total += count
        # Workers share this object but run on one event loop: no await between the two lines.
        self.stream.write(f"{time.time():f},{count} (total = {self.total})\n".encode())
        self.stream.flush()
