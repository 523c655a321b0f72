"""Fake servers for sinks whose real server cannot be installed here, plus a scripted HTTP
server for answers no real server gives on demand (HTML error pages, garbage, hangs)."""
