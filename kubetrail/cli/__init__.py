"""The command line: ``kubetrail run|check|convert|plugins|version``."""
