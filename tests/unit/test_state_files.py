"""One state file, one owner: two plugins keeping state in the same file are refused at load
time (kubetrail.core.state.check_state_files), except tails with an alias each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetrail.cli.main import main
from kubetrail.core.config import load_config
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.state import DB_OPTIONS, STATE_FILES
from kubetrail.runtime.plugins import SINKS, SOURCES, TRANSFORMS
from tests.unit.helpers import write

OUTPUT = "[OUTPUT]\n    name stdout\n    match *\n"


def tail(path: str, db: str, alias: str | None = None, extra: str = "") -> str:
    text = f"[INPUT]\n    name tail\n    path {path}\n    db {db}\n"
    return text + (f"    alias {alias}\n" if alias else "") + extra


def refused(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "p.conf", text))
    return info.value


def test_two_tails_without_alias_on_one_db_are_refused_naming_both(tmp_path: Path) -> None:
    db = tmp_path / "tail.db"
    error = refused(tmp_path, tail("/var/log/a.log", str(db)) + tail("/var/log/b.log", str(db)) + OUTPUT)
    text = str(error)
    # Both inputs with where they were written, the file, and what to do.
    assert "input tail (" in text and f"{tmp_path / 'p.conf'}:1)" in text and f"{tmp_path / 'p.conf'}:5)" in text
    assert str(db) in text
    assert "its own db" in text and "alias" in text
    assert error.key == "db" and error.location is not None and error.location.line == 8


def test_tails_with_distinct_aliases_share_a_db(tmp_path: Path) -> None:
    db = str(tmp_path / "tail.db")
    config = load_config(
        write(
            tmp_path / "p.conf",
            tail("/var/log/a.log", db, "a") + tail("/var/log/b.log", db, "b") + tail("/x/*.log", db, "c") + OUTPUT,
        )
    )
    assert [s.get("alias") for s in config.inputs] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ("", "alias"),  # one of them without an alias
        ("    alias a\n", "both have alias 'a'"),
        ("    alias b\n    db.journal_mode delete\n", "db.journal_mode wal and delete"),
        ("    alias b\n    db.locking on\n", "db.locking on"),
    ],
)
def test_tails_sharing_a_db_need_their_own_alias_and_the_same_db_settings(
    tmp_path: Path, second: str, message: str
) -> None:
    db = str(tmp_path / "tail.db")
    error = refused(tmp_path, tail("/a.log", db, "a") + tail("/b.log", db, extra=second) + OUTPUT)
    assert message in str(error)


def test_a_third_tail_is_compared_with_every_earlier_one(tmp_path: Path) -> None:
    db = str(tmp_path / "tail.db")
    error = refused(tmp_path, tail("/a", db, "a") + tail("/b", db, "b") + tail("/c", db, "b") + OUTPUT)
    assert "both have alias 'b'" in str(error)


def test_one_file_under_other_names_is_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state").mkdir()
    monkeypatch.chdir(tmp_path)
    # A relative path, a path through "..", a symlink and a hard link all name state/tail.db.
    os.symlink(tmp_path / "state", tmp_path / "link")
    write(tmp_path / "state" / "tail.db", "")
    os.link(tmp_path / "state" / "tail.db", tmp_path / "hard.db")
    for other in ("state/../state/tail.db", str(tmp_path / "link" / "tail.db"), "hard.db"):
        error = refused(tmp_path, tail("/a", "state/tail.db") + tail("/b", other) + OUTPUT)
        assert "both keep their state in" in str(error), other
    # A different file in the same directory is fine.
    load_config(write(tmp_path / "p.conf", tail("/a", "state/tail.db") + tail("/b", "state/other.db") + OUTPUT))


EVENTS = "[INPUT]\n    name kubernetes_events\n    kube_url https://127.0.0.1:6443\n    db {db}\n{extra}"
SYSTEMD = "[INPUT]\n    name systemd\n    db {db}\n{extra}"
AUDIT = "[FILTER]\n    name kubernetes_audit\n    match *\n    db {db}\n{extra}"
SQLITE = "[OUTPUT]\n    name sqlite\n    match *\n    path {db}\n{extra}"


@pytest.mark.parametrize(
    ("template", "words"),
    [
        (EVENTS, "resourceVersion"),
        (SYSTEMD, "cursor"),
        (AUDIT, "auditID"),
        (SQLITE, "one writer"),
    ],
)
def test_other_plugins_never_share_their_file_even_with_aliases(tmp_path: Path, template: str, words: str) -> None:
    db = str(tmp_path / "state.db")
    first = template.format(db=db, extra="    alias one\n")
    second = template.format(db=db, extra="    alias two\n")
    inputs = "" if template.startswith("[INPUT]") else tail("/a", str(tmp_path / "own.db"))
    error = refused(tmp_path, inputs + first + second + OUTPUT)
    text = str(error)
    assert "'one'" in text and "'two'" in text and db in text and words in text
    assert "its own" in text


def test_a_tail_and_another_plugin_never_share_a_file(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    error = refused(tmp_path, tail("/a", db, "logs") + AUDIT.format(db=db, extra="") + OUTPUT)
    assert "input tail 'logs'" in str(error) and "filter kubernetes_audit" in str(error)
    error = refused(tmp_path, tail("/a", db, "logs") + OUTPUT + SQLITE.format(db=db, extra=""))
    assert "output sqlite" in str(error)


def test_a_file_the_plugin_does_not_open_is_not_a_claim(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    # Without dedupe the audit filter opens no db; ":memory:" is private to each connection.
    no_dedupe = AUDIT.format(db=db, extra="    dedupe off\n")
    load_config(write(tmp_path / "p.conf", tail("/a", db) + no_dedupe + OUTPUT))
    load_config(write(tmp_path / "p.conf", tail("/a", ":memory:") + tail("/b", ":memory:") + OUTPUT))


def test_yaml_processors_are_checked_too(tmp_path: Path) -> None:
    db = tmp_path / "dedupe.db"
    text = f"""
pipeline:
  inputs:
    - name: tail
      path: /a.log
      processors:
        logs:
          - name: kubernetes_audit
            db: {db}
  filters:
    - name: kubernetes_audit
      match: "*"
      db: {db}
  outputs:
    - name: stdout
      match: "*"
"""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "p.yaml", text))
    assert "processor kubernetes_audit" in str(info.value) and "filter kubernetes_audit" in str(info.value)


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_exit_2_before_anything_opens_the_file(tmp_path: Path, command: str) -> None:
    db = tmp_path / "state" / "tail.db"
    config = write(tmp_path / "p.conf", tail("/a", str(db)) + tail("/b", str(db)) + OUTPUT)
    result = CliRunner().invoke(main, [command, "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "configuration error" in result.output and str(db) in result.output
    assert not db.parent.exists()  # nothing was opened or created


def test_every_plugin_with_a_state_file_is_under_the_rule() -> None:
    """A new plugin with Fluent Bit's ``db`` options must say in STATE_FILES how it shares."""
    db_option = DB_OPTIONS[0]
    missing = []
    for kind, registry in (("input", SOURCES), ("filter", TRANSFORMS), ("output", SINKS)):
        for name in registry:
            try:
                options: tuple[Option, ...] = registry[name].options
            except ImportError:  # an optional dependency missing here: its options are unknown
                continue
            if db_option in options and (kind, name) not in STATE_FILES:
                missing.append(f"{kind} {name}")
    assert missing == []
    for (kind, name), use in STATE_FILES.items():
        registry = {"input": SOURCES, "filter": TRANSFORMS, "output": SINKS}[kind]
        assert use.option in {o.name for o in registry[name].options}, (kind, name)
