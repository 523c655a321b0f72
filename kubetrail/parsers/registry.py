"""Built-in parsers and the ones declared in ``[PARSER]`` sections / ``parsers:`` lists.

Built-ins mirror the entries of Fluent Bit's stock ``parsers.conf`` that Kubernetes users rely
on (``json``, ``docker``, ``cri``) plus ``k8s_audit`` for the API server's audit log. A
``[PARSER]`` with the same name overrides a built-in.
"""

from __future__ import annotations

from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option, Section, resolve_options
from kubetrail.parsers.base import Parser
from kubetrail.parsers.decoders import FieldDecoders
from kubetrail.parsers.json_parser import JsonParser
from kubetrail.parsers.klog_parser import KlogParser
from kubetrail.parsers.logfmt_parser import LogfmtParser
from kubetrail.parsers.logr_parser import LogrParser
from kubetrail.parsers.ltsv_parser import LtsvParser
from kubetrail.parsers.regex_parser import RegexParser
from kubetrail.parsers.timefmt import parse_time_offset

FORMATS = ("json", "regex", "logfmt", "ltsv", "tskv")

PARSER_OPTIONS: tuple[Option, ...] = (
    Option("name", required=True, help="Name that inputs and filters refer to"),
    Option("format", "choice", choices=FORMATS, required=True, help="Parser kind"),
    Option("regex", help="Regular expression with named groups (format regex)"),
    Option("time_key", help="Key holding the record's time (logfmt, ltsv: time)"),
    # Repeatable because Fluent Bit's stock parsers.conf sets it twice in syslog-rfc3164; the
    # first one is used, as Fluent Bit reads the first value of a repeated key.
    Option("time_format", multiple=True, help="strptime format of time_key; %L is fractional seconds"),
    Option("time_keep", "bool", False, help="Keep time_key in the record after taking the time from it"),
    Option("time_offset", help="Offset applied to times without a zone, e.g. +0200"),
    Option("types", help="Conversions, e.g. 'code:integer latency:float'"),
    Option("skip_empty_values", "bool", True, help="Drop keys whose group matched nothing (regex)"),
    Option("decode_field", multiple=True, help="DECODER FIELD [ACTION]: add the keys of a JSON field"),
    Option("decode_field_as", multiple=True, help="DECODER FIELD [ACTION]: replace the field by its decoded value"),
    Option("logfmt_no_bare_keys", "bool", False, help="A logfmt line with a key without '=' does not match"),
)

CRI_REGEX = r"^(?<time>[^ ]+) (?<stream>stdout|stderr) (?<logtag>[^ ]*) ?(?<message>.*)$"


def builtin_parsers() -> dict[str, Parser]:
    return {
        "json": JsonParser("json"),
        "docker": JsonParser("docker", time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%L%z", time_keep=True),
        "cri": RegexParser("cri", CRI_REGEX, time_key="time", time_format="%Y-%m-%dT%H:%M:%S.%L%z", time_keep=True),
        "k8s_audit": JsonParser("k8s_audit", time_key="stageTimestamp", time_keep=True),
        "klog": KlogParser("klog"),
        "logr": LogrParser("logr"),
    }


class ParserRegistry:
    def __init__(self, parsers: dict[str, Parser] | None = None) -> None:
        self._parsers = builtin_parsers()
        if parsers:
            self._parsers.update(parsers)

    def get(self, name: str) -> Parser | None:
        return self._parsers.get(name)

    def names(self) -> list[str]:
        return sorted(self._parsers)

    def add_section(self, section: Section) -> None:
        values = resolve_options(section, PARSER_OPTIONS, "[PARSER]", ignore=())
        name = values["name"]
        time_format = values["time_format"][0] if values["time_format"] else None
        kwargs: dict[str, object] = {
            "time_key": values["time_key"],
            "time_format": time_format,
            "time_keep": values["time_keep"],
        }
        decoders = FieldDecoders()
        for option in ("decode_field", "decode_field_as"):
            for prop in section.get_all(option):
                try:
                    decoders.add(prop.value, as_value=option == "decode_field_as")
                except ValueError as exc:
                    raise ConfigError(f"parser {name!r}: {exc}", prop.location, option) from None
        if decoders:
            kwargs["decoders"] = decoders
        try:
            if values["time_offset"]:
                kwargs["time_offset"] = parse_time_offset(values["time_offset"])
            if values["types"]:
                kwargs["types"] = dict(item.split(":", 1) for item in values["types"].split())
            if time_format:
                # Compile now so a bad format fails at config time, not on the first record.
                from kubetrail.parsers.timefmt import TimeParser

                TimeParser(time_format)
            if values["format"] == "json":
                parser: Parser = JsonParser(name, **kwargs)
            elif values["format"] == "logfmt":
                parser = LogfmtParser(name, no_bare_keys=values["logfmt_no_bare_keys"], **kwargs)
            elif values["format"] in ("ltsv", "tskv"):
                parser = LtsvParser(name, separator=":" if values["format"] == "ltsv" else "=", **kwargs)
            else:
                if not values["regex"]:
                    raise ConfigError("format regex needs a 'regex'", section.location, "regex")
                parser = RegexParser(
                    name,
                    values["regex"],
                    skip_empty_values=values["skip_empty_values"],
                    **kwargs,
                )
        except ConfigError:
            raise
        except (ValueError, Exception) as exc:
            raise ConfigError(f"parser {name!r}: {exc}", section.location) from None
        self._parsers[name] = parser
