"""The ``lua`` filter: run a Lua function on every record, with Fluent Bit's contract.

The function named by ``call`` is defined by ``script`` (a file, relative to the config file
that names it) or ``code`` (inline; it wins when both are set, as in Fluent Bit). It is called
as ``f(tag, timestamp, record)`` and returns ``code, timestamp, record``:

* ``-1`` drops the record; ``0`` keeps it unchanged; ``1`` replaces the record and its time;
  ``2`` replaces the record and keeps its time. Any other code keeps the record (logged).
* The returned record may be a table of records (an array of maps): the one record becomes
  several, each with the same time. A returned value that is neither is an error.
* ``time_as_table on`` passes and takes the time as ``{sec = ..., nsec = ...}`` instead of a
  number of seconds (which loses nanoseconds).
* Lua tables come back as arrays when they have positive whole number keys (up to the largest,
  holes as nulls, as Fluent Bit's ``table.maxn`` rule), as maps otherwise (an empty table is a
  map). ``type_array_key`` names keys whose table values are always arrays (so an
  empty one is ``[]``); ``type_int_key`` names keys whose numbers become integers. Both apply
  at any depth, as in Fluent Bit. Whole numbers come back as integers.
* ``enable_flb_null on`` passes JSON nulls as the global ``flb_null`` (so that ``record.k ==
  flb_null`` can be tested and the key is kept); without it a null is ``nil`` and the key is
  absent in Lua, as in Fluent Bit.

Runtime: LuaJIT 2.1, as in Fluent Bit, from the ``lupa`` package (PyPI), which ships the Lua
runtimes compiled in (Lua 5.4 is used where its LuaJIT build is missing). One Lua state per
filter instance; records are converted to Lua tables and back for each call.

Errors: a script that does not compile, fails while loading, or lacks the ``call`` function is
a configuration error with Lua's message (file and line). An error while a record is filtered
(the function raises, returns an invalid table) leaves that record unchanged, as Fluent Bit
does; it is counted (``kubetrail_errors_total{type="lua_error"}``) and logged when the state
changes: the first failure, then once the script works again. ``protected_mode off`` (Fluent
Bit: a script error aborts the process) is accepted and has no effect here: errors are always
caught, since a crash would lose what is in flight.

A record the function keeps (code 0, or an error) keeps its original bytes. When a record is
split, each part gets the original identity plus its index, so an idempotent sink (``es``
``_id``) stores every part once, also on replay.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from typing import Any

from kubetrail.core.component import ComponentContext, Transform
from kubetrail.core.errors import ConfigError
from kubetrail.core.options import Option
from kubetrail.core.record import Record


def _lupa_module() -> Any:
    for name in ("lupa.luajit21", "lupa.lua54"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module("lupa")


class LuaError(Exception):
    """An error while a record is filtered (the record passes unchanged)."""


class LuaTransform(Transform):
    plugin_name = "lua"
    description = "Runs a Lua function on every record (Fluent Bit's lua filter contract)"
    options = (
        Option("script", help="Lua file, relative to the config file that names it"),
        Option("code", help="Inline Lua code (instead of script)"),
        Option("call", required=True, help="Name of the function to call for each record"),
        Option("protected_mode", "bool", True, help="Accepted; errors are always caught here"),
        Option("time_as_table", "bool", False, help="Pass the time as {sec, nsec} instead of seconds"),
        Option("type_int_key", help="Space-separated keys whose numbers become integers"),
        Option("type_array_key", help="Space-separated keys whose tables are always arrays"),
        Option("enable_flb_null", "bool", False, help="Pass nulls as flb_null instead of nil"),
    )

    def __init__(self, ctx: ComponentContext, config: dict[str, Any]) -> None:
        super().__init__(ctx, config)
        self.lupa = _lupa_module()
        self.time_as_table: bool = config["time_as_table"]
        self.int_keys = frozenset((config["type_int_key"] or "").split())
        self.array_keys = frozenset((config["type_array_key"] or "").split())
        self.call: str = config["call"]
        # Strings cross as bytes (encoding=None): a script may build any byte string, which
        # must not fail the conversion back; invalid UTF-8 becomes U+FFFD there.
        self.lua = self.lupa.LuaRuntime(unpack_returned_tuples=True, encoding=None)
        self.null: Any = None
        self.is_null: Any = None
        if config["enable_flb_null"]:
            # Fluent Bit's flb_null is a light userdata; LuaJIT's newproxy gives a userdata too
            # (Lua 5.4 has none: a table, recognised with rawequal).
            self.lua.execute(b"flb_null = newproxy and newproxy(false) or setmetatable({}, {})")
            self.null = self.lua.globals()[b"flb_null"]
            self.is_null = self.lua.eval(b"function(v) return rawequal(v, flb_null) end")
        code, chunk_name = self._source(ctx, config)
        self.script_dir = None if config["code"] else self._script_path(ctx, config["script"]).parent
        lua_globals = self.lua.globals()
        where = "code" if config["code"] else "script"
        loaded = lua_globals.load(code, chunk_name.encode())
        chunk, error = loaded if isinstance(loaded, tuple) else (loaded, None)
        if chunk is None:
            raise ConfigError(f"Lua script does not compile: {self._where(_text(error))}", key=where)
        try:
            chunk()
        except self.lupa.LuaError as exc:
            raise ConfigError(f"Lua script failed while loading: {self._where(_lua_message(exc))}", key=where) from None
        function = lua_globals[self.call.encode()]
        if self.lupa.lua_type(function) != "function":
            raise ConfigError(f"function {self.call!r} is not defined by the script", key="call")
        self.function = function
        self.table_from = self.lua.table_from
        self.lua_type = self.lupa.lua_type
        self.lua_error = self.lupa.LuaError
        self.failing = False
        self.failures = 0
        if not config["protected_mode"]:
            self.log.info(
                "protected_mode off has no effect: script errors are always caught",
                extra={"component": ctx.component_id},
            )

    @staticmethod
    def _source(ctx: ComponentContext, config: dict[str, Any]) -> tuple[bytes, str]:
        if config["code"]:
            if config["script"]:
                ctx.logger.info("both code and script are set; code is used, as in Fluent Bit")
            return config["code"].encode(), "=code"
        script = config["script"]
        if not script:
            raise ConfigError("the lua filter needs 'script' (a file) or 'code' (inline Lua)", key="script")
        path = LuaTransform._script_path(ctx, script)
        try:
            # Lua cuts chunk names longer than ~60 characters ("...st/dir/x.lua:3:"): the file
            # name goes in, and the directory is put back in front of Lua's messages.
            return path.read_bytes(), f"@{path.name}"
        except OSError as exc:
            raise ConfigError(f"cannot read Lua script {str(path)!r}: {exc.strerror}", key="script") from None

    @staticmethod
    def _script_path(ctx: ComponentContext, script: str) -> Path:
        """Relative to the config file that names it, as Fluent Bit resolves it."""
        path = Path(script)
        if not path.is_absolute() and ctx.section is not None:
            beside = Path(ctx.section.location_of("script").file).parent / path
            if beside.exists() or not path.exists():
                path = beside
        return path

    def _where(self, message: str) -> str:
        """Lua's ``name.lua:LINE: ...`` with the script's directory in front."""
        if self.script_dir is None or message.startswith(("/", "[")):
            return message
        return f"{self.script_dir}{os.sep}{message}"

    # --- Python -> Lua --------------------------------------------------------------------

    def _encode(self, value: Any) -> Any:
        """Strings to bytes (the runtime has no encoding), nulls to ``flb_null`` if enabled.
        Exact type checks first: this runs for every value of every record."""
        cls = type(value)
        if cls is str:
            return value.encode()
        if cls is dict:
            encode = self._encode
            return {
                (k.encode() if type(k) is str else k): (v.encode() if type(v) is str else encode(v))
                for k, v in value.items()
            }
        if cls is list:
            return [self._encode(v) for v in value]
        if value is None:
            return self.null
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, dict):
            return self._encode(dict(value))
        if isinstance(value, list | tuple):
            return [self._encode(v) for v in value]
        return value

    # --- Lua -> Python --------------------------------------------------------------------

    def _decode(self, value: Any, key: str | None = None) -> Any:
        cls = type(value)
        if cls is bytes:
            return value.decode("utf-8", "replace")
        if cls is int or cls is bool or value is None:
            return value
        if cls is float:
            if key is not None and key in self.int_keys and math.isfinite(value):
                return int(value)
            return int(value) if value.is_integer() and abs(value) < 2**63 else value
        return self._decode_table(value, key)

    def _decode_table(self, value: Any, key: str | None) -> Any:
        kind = self.lua_type(value)
        if self.is_null is not None and (kind == "userdata" or self.is_null(value)):
            return None
        if kind != "table":
            raise LuaError(f"cannot convert a Lua {kind} to a record value")
        items = list(value.items())
        decode = self._decode
        # lua_arraylength() (flb_lua.c): a table with a positive whole number key is an array up to
        # its largest one (table.maxn): holes are nulls and other keys are left out. A sparse
        # table whose largest index is far beyond its size is kept as a map instead of growing
        # into a huge array of nulls. A type_array_key value is an array in any case.
        as_array = key is not None and key in self.array_keys
        indexed: dict[Any, Any] = {k: v for k, v in items if type(k) in (int, float) and k > 0}
        if indexed or as_array:
            maxn = max(indexed) if indexed else 0
            if maxn == int(maxn) and (as_array or maxn <= 16 * len(items) + 1024):
                return [decode(indexed[i]) if i in indexed else None for i in range(1, int(maxn) + 1)]
        out: dict[str, Any] = {}
        int_keys = self.int_keys
        for k, v in items:
            name = k.decode("utf-8", "replace") if type(k) is bytes else _text(k)
            cls = type(v)
            if cls is bytes:
                out[name] = v.decode("utf-8", "replace")
            elif cls is int or cls is bool or (cls is float and not int_keys and not v.is_integer()):
                out[name] = v
            else:
                out[name] = decode(v, name)
        return out

    def _time_in(self, time_ns: int) -> Any:
        if self.time_as_table:
            seconds, nanos = divmod(time_ns, 1_000_000_000)
            return self.table_from({b"sec": seconds, b"nsec": nanos})
        return time_ns / 1e9

    def _time_out(self, value: Any) -> int:
        if self.lua_type(value) == "table":
            seconds, nanos = value[b"sec"], value[b"nsec"]
            return int(_number(seconds)) * 1_000_000_000 + int(_number(nanos))
        # Fluent Bit's flb_time_from_double: whole seconds, then the fraction in nanoseconds.
        number = _number(value)
        seconds = int(number)
        return seconds * 1_000_000_000 + int((number - seconds) * 1e9)

    # --- filtering ------------------------------------------------------------------------

    def _call(self, record: Record) -> list[Record] | None:
        """The records that replace ``record``, or None to keep it as it is."""
        result = self.function(
            record.tag.encode(),
            self._time_in(record.time_ns),
            self.table_from(self._encode(record.body), recursive=True),
        )
        if not isinstance(result, tuple):
            result = (result,)
        code_value, time_value, body_value = (*result, None, None, None)[:3]
        code = int(_number(code_value))
        if code == -1:
            return []
        if code == 0:
            return None
        if code not in (1, 2):
            raise LuaError(f"unexpected Lua script return code {code}; the original record is kept")
        time_ns = self._time_out(time_value) if code == 1 else record.time_ns
        if self.lua_type(body_value) != "table":
            raise LuaError(f"invalid table returned by {self.call}(): not a table")
        decoded = self._decode(body_value)
        bodies = decoded if isinstance(decoded, list) else [decoded]
        if not bodies or not all(isinstance(b, dict) and b for b in bodies):
            raise LuaError(f"invalid table returned by {self.call}(): a record must be a non-empty map")
        if len(bodies) == 1:
            record.replace_body(bodies[0])
            record.time_ns = time_ns
            return [record]
        identity = record.identity
        return [
            Record(record.tag, time_ns, body, None, None if identity is None else (*identity, index), record.meta)
            for index, body in enumerate(bodies)
        ]

    def process(self, records: list[Record]) -> list[Record]:
        out: list[Record] = []
        for record in records:
            try:
                replaced = self._call(record)
            except (self.lua_error, LuaError, TypeError, ValueError) as exc:
                self._failed(exc)
                out.append(record)
                continue
            if self.failing:
                self._recovered()
            if replaced is None:
                out.append(record)
            else:
                out.extend(replaced)
        return out

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.metrics.error("lua_error")
        if not self.failing:
            self.failing = True
            self.log.error(
                "Lua function %s failed; the record passes unchanged (logged again once it works): %s",
                self.call,
                _lua_message(exc),
                extra={"component": self.ctx.component_id},
            )

    def _recovered(self) -> None:
        self.log.info(
            "Lua function %s works again after %d failed records",
            self.call,
            self.failures,
            extra={"component": self.ctx.component_id},
        )
        self.failing = False
        self.failures = 0


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _lua_message(exc: Exception) -> str:
    text = _text(exc.args[0]) if exc.args else str(exc)
    return text.splitlines()[0] if text else text  # the message, not the stack traceback


def _number(value: Any) -> float:
    """Lua's lua_tonumber: numbers, and strings that hold one; anything else is 0."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int | float):
        return value
    if isinstance(value, bytes):
        try:
            return float(value)
        except ValueError:
            return 0
    return 0
