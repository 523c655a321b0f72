"""Transforms (Fluent Bit's filters): one module per plugin, each a synchronous ``process``."""
