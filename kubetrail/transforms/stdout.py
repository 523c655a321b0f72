"""The ``stdout`` filter: print the records that pass by, unchanged (Fluent Bit's debugging filter).

Fluent Bit users put ``[FILTER] Name stdout`` between two filters to see what one of them did.
The lines have the ``stdout`` output's default form (``[N] tag: [time, record]``), so the two read
the same; the records go on untouched (their original bytes stay valid for the sinks).
"""

from __future__ import annotations

import sys
from typing import Any, BinaryIO

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.dates import epoch_text
from kubetrail.core.record import Record


class StdoutTransform(Transform):
    plugin_name = "stdout"
    description = "Prints the records it sees to standard output and passes them on unchanged"
    options = ()

    def __init__(self, ctx: ComponentContext, config: dict[str, Any], stream: BinaryIO | None = None) -> None:
        super().__init__(ctx, config)
        self.stream = stream or sys.stdout.buffer
        self._counter = 0

    def process(self, records: list[Record]) -> list[Record]:
        lines = []
        for record in records:
            lines.append(
                f"[{self._counter}] {record.tag}: [{epoch_text(record.time_ns)}, ".encode()
                + record.json_bytes()
                + b"]\n"
            )
            self._counter += 1
        if lines:
            self.stream.write(b"".join(lines))
            self.stream.flush()
        return records
