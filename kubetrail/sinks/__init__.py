"""Sinks: one module per output plugin. Each declares its options and implements ``write``."""
