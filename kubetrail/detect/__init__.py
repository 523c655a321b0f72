"""Detections on audit records: Falco's rules language for the k8s_audit source.

``rules`` reads rules files (lists, macros, rules, append/override, exceptions), ``condition``
parses and compiles conditions, ``fields`` extracts Falco's ``ka.*``/``jevt.*`` fields from an
audit event, ``engine`` holds the compiled, indexed rules and makes alerts. The ``detect``
filter (``kubetrail/transforms/detect.py``) and ``kubetrail rules`` use it.
"""

from kubetrail.detect.engine import Alert, CompiledRule, Engine, compile_rules, load_rules
from kubetrail.detect.fields import FIELDS, Event, decode_block
from kubetrail.detect.rules import PRIORITIES, RulesError, RuleSet, expand_paths, priority_level

__all__ = [
    "FIELDS",
    "PRIORITIES",
    "Alert",
    "CompiledRule",
    "Engine",
    "Event",
    "RuleSet",
    "RulesError",
    "compile_rules",
    "decode_block",
    "expand_paths",
    "load_rules",
    "priority_level",
]
