"""Parsers turn a line of bytes into a record body and a timestamp.

They sit just above ``core`` because both sources (``tail``'s ``parser``) and transforms use
them. Each parser works on a list of lines at once, since per-call overhead is what a Python
collector must save. See :mod:`.registry` for the built-in parsers and ``[PARSER]`` sections.
"""
