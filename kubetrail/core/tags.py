"""Tags as Fluent Bit builds them from file paths."""

from __future__ import annotations


def expand_tag(template: str, path: str) -> str:
    """A ``tag`` with ``*``: the star becomes the file path with ``/`` turned into ``.``.

    ``kube.*`` + ``/var/log/containers/a.log`` -> ``kube.var.log.containers.a.log``.
    """
    if "*" not in template:
        return template
    return template.replace("*", path.lstrip("/").replace("/", "."))
