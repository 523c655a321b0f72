"""The text form of a timeline: one line per entry, what changed indented under it; an alert's
line follows its audit record's (or says which record fired it)."""

from __future__ import annotations

from typing import Any

from kubetrail.history.model import change_text, summary

LABELS = {"audit": "AUDIT", "event": "EVENT", "log": "LOG  ", "alert": "ALERT", "other": "OTHER"}


def lines(entries: list[dict[str, Any]]) -> list[str]:
    out = []
    for entry in entries:
        out.append(f"{entry['time']}  {LABELS.get(entry['kind'], entry['kind'])}  {summary(entry)}")
        for change in entry.get("changes", ()):
            out.append(f"{'':26}{change_text(change)}")
        if entry.get("changes_omitted"):
            out.append(f"{'':26}... {entry['changes_omitted']} more fields")
        if entry.get("trigger"):  # an alert shown away from its audit record (a search)
            out.append(f"{'':26}fired by {entry['trigger']['time']} {entry['trigger']['summary']}")
    return out
