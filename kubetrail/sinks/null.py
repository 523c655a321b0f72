"""The ``null`` output: accepts every record and throws it away, as Fluent Bit's ``out_null``.

Useful to benchmark inputs and filters, or to route records that should go nowhere. A batch
counts as delivered at once, so the sources' checkpoints move: the records are *meant* to be
discarded, which is different from a drop (no ``kubetrail_records_dropped`` is counted).
"""

from __future__ import annotations

from kubetrail.core.component import Sink
from kubetrail.core.record import Batch


class NullSink(Sink):
    plugin_name = "null"
    description = "Throws records away"
    options = ()

    async def write(self, batch: Batch) -> None:
        return None  # delivered: nothing to do
