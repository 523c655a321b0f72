from pathlib import Path

import pytest

from kubetrail.core.config import load_config
from kubetrail.core.config.convert import to_classic, to_yaml
from kubetrail.core.errors import ConfigError
from tests.unit.helpers import write

CLASSIC = """\
@SET level=debug
[SERVICE]
    Log_Level ${level}
    Parsers_File parsers.conf
@INCLUDE inputs/*.conf
[FILTER]
    Name   grep
    Match  app.*
    Regex  log ^a
    Regex  stream stdout
[OUTPUT]
    Name  stdout
    Match *
"""


def test_classic_with_include_set_env_and_parsers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_DIR", "/var/log/app")
    write(tmp_path / "inputs" / "a.conf", "[INPUT]\n    Name tail\n    Path ${LOG_DIR}/*.log\n    Tag app.*\n")
    write(
        tmp_path / "parsers.conf",
        "[PARSER]\n    Name p1\n    Format json\n[MULTILINE_PARSER]\n    name ml\n"
        '    type regex\n    rule "start_state" "/^a/" "cont"\n',
    )
    config = load_config(write(tmp_path / "main.conf", CLASSIC))
    assert config.service.get("log_level") == "debug"
    assert [s.plugin_name for s in config.inputs] == ["tail"]
    assert config.inputs[0].get("path") == "/var/log/app/*.log"
    assert config.inputs[0].location.file.endswith("a.conf")
    assert [p.value for p in config.filters[0].get_all("regex")] == ["log ^a", "stream stdout"]
    assert config.parsers[0].get("name") == "p1" and config.multiline_parsers[0].get("rule")


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("[INPUTS]\n    Name tail\n", "unknown section [INPUTS]", 1),
        ("[INPUT]\n    Name tail\n    Path ${NOPE_NOT_SET}\n", "${NOPE_NOT_SET} is not defined", 3),
        ("    Name tail\n", "property outside of a section", 1),
        ("[INPUT\n", "not closed", 1),
        ("@FOO bar\n", "unknown command @FOO", 1),
        ("[SERVICE]\n@INCLUDE missing.conf\n", "@INCLUDE file not found", 2),
    ],
)
def test_classic_errors_name_the_line(tmp_path: Path, text: str, message: str, line: int) -> None:
    path = write(tmp_path / "bad.conf", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert info.value.location is not None and info.value.location.line == line
    assert info.value.location.file == str(path)


YAML = """\
env:
  out_dir: /tmp/out
service:
  log_level: info
  parsers_file: parsers.yaml
pipeline:
  inputs:
    - name: tail
      path: /var/log/a.log
      tag: app
  filters:
    - name: grep
      match: app
      regex:
        - log ^a
        - stream stdout
  outputs:
    - name: file
      match: '*'
      path: ${out_dir}
      mkdir: true
"""


def test_yaml_format(tmp_path: Path) -> None:
    write(
        tmp_path / "parsers.yaml",
        "parsers:\n  - name: p1\n    format: json\n"
        "multiline_parsers:\n  - name: ml\n    type: regex\n    rules:\n"
        "      - state: start_state\n        regex: '^a'\n        next_state: cont\n",
    )
    config = load_config(write(tmp_path / "c.yaml", YAML))
    assert config.outputs[0].get("path") == "/tmp/out"
    assert config.outputs[0].get("mkdir") == "true"
    assert [p.value for p in config.filters[0].get_all("regex")] == ["log ^a", "stream stdout"]
    assert config.filters[0].location.line == 12
    assert config.parsers[0].get("name") == "p1"
    assert config.multiline_parsers[0].get("rule") == '"start_state" "/^a/" "cont"'


def test_yaml_includes(tmp_path: Path) -> None:
    write(tmp_path / "out.yaml", "pipeline:\n  outputs:\n    - name: stdout\n      match: '*'\n")
    config = load_config(
        write(tmp_path / "c.yaml", "includes:\n  - out.yaml\npipeline:\n  inputs:\n    - name: tail\n      path: /x\n")
    )
    assert [s.plugin_name for s in config.outputs] == ["stdout"]


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("pipeline:\n  inputs:\n    - name: tail\n   path: x\n", "YAML does not parse", 4),
        ("pipelines:\n  inputs: []\n", "unknown top-level key 'pipelines'", 1),
        ("pipeline:\n  sources: []\n", "unknown key 'sources' under pipeline", 2),
        ("pipeline:\n  inputs:\n    - name: tail\n      path: {a: 1}\n", "expected a single value", 4),
    ],
)
def test_yaml_errors_name_the_line(tmp_path: Path, text: str, message: str, line: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path / "bad.yaml", text))
    assert message in str(info.value)
    assert info.value.location is not None and info.value.location.line == line


def test_convert_round_trip(tmp_path: Path) -> None:
    write(tmp_path / "inputs" / "a.conf", "[INPUT]\n    Name tail\n    Path /x/*.log\n    Tag app.*\n")
    write(tmp_path / "parsers.conf", "[PARSER]\n    Name p1\n    Format json\n")
    original = load_config(
        write(tmp_path / "main.conf", CLASSIC.replace("${level}", "info").replace("@SET level=debug\n", ""))
    )
    converted = load_config(write(tmp_path / "conv.yaml", to_yaml(original)))
    back = load_config(write(tmp_path / "back.conf", to_classic(converted)))
    for config in (converted, back):
        assert [(p.name, p.value) for s in config.filters for p in s.properties] == [
            (p.name, p.value) for s in original.filters for p in s.properties
        ]
        assert config.parsers[0].get("name") == "p1"
        assert config.inputs[0].get("path") == "/x/*.log"
