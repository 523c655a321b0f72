"""Wake-ups for ``tail`` from inotify, with polling as the fallback (``inotify_watcher off``).

inotify only says *that* something changed, never *what* to read: the tail still reads every
file to its end and re-checks rotation itself, so a lost or coalesced event (the queue can
overflow) costs latency, never data. That is why the events are not interpreted here at all:
any event sets a flag that ends the tail's idle wait.

Watched: the directories of the path patterns (new files, renames, deletions) and each
followed file's real path (writes; ``/var/log/containers/*.log`` are symlinks into
``/var/log/pods``, whose writes the symlink's directory never reports).

`inotify_simple <https://pypi.org/project/inotify-simple/>`_ is a ~100-line ctypes wrapper
that hands out the raw descriptor, which asyncio's ``add_reader`` can wait on directly; the
async-native alternatives add their own task and queue for no gain here.
"""

from __future__ import annotations

import asyncio
import logging
import os

from inotify_simple import INotify, flags

_DIR_MASK = (
    flags.CREATE | flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE | flags.MODIFY | flags.ATTRIB | flags.CLOSE_WRITE
)
_FILE_MASK = flags.MODIFY | flags.ATTRIB | flags.MOVE_SELF | flags.DELETE_SELF | flags.CLOSE_WRITE


class FileWatcher:
    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._inotify: INotify | None = None
        self._event = asyncio.Event()
        self._watches: dict[str, int] = {}
        self._dir_wds: set[int] = set()
        self.dirs_changed = False  # a file appeared in a watched directory: scan now
        self._failed_paths: set[str] = set()
        self.active = False

    def start(self) -> bool:
        """Open the inotify descriptor; ``False`` (and a warning) means poll instead."""
        try:
            self._inotify = INotify(nonblocking=True)
            asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)
        except OSError as exc:
            self.log.warning("inotify unavailable; polling instead", extra={"error": str(exc)})
            self._inotify = None
            return False
        self.active = True
        return True

    def _readable(self) -> None:
        assert self._inotify is not None
        try:
            events = self._inotify.read(timeout=0)
        except (BlockingIOError, OSError):
            events = []
        for event in events:  # only "something new in a directory" matters (see module doc)
            new_entry = event.wd in self._dir_wds and event.mask & (flags.CREATE | flags.MOVED_TO)
            if new_entry or event.mask & flags.Q_OVERFLOW:
                self.dirs_changed = True
        self._event.set()

    def watch(self, path: str, directory: bool) -> None:
        if self._inotify is None or path in self._watches:
            return
        try:
            wd = self._watches[path] = self._inotify.add_watch(path, _DIR_MASK if directory else _FILE_MASK)
            if directory:
                self._dir_wds.add(wd)
        except OSError as exc:
            # ENOSPC: fs.inotify.max_user_watches reached. Polling still covers this path.
            if path not in self._failed_paths:
                self._failed_paths.add(path)
                self.log.warning("cannot watch path; it is polled", extra={"path": path, "error": str(exc)})

    def unwatch(self, path: str) -> None:
        wd = self._watches.pop(path, None)
        if wd is not None:
            self._dir_wds.discard(wd)
        if wd is not None and self._inotify is not None:
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass  # the kernel removed it already (file deleted)

    def forget_missing(self) -> None:
        """Drop watches of paths that no longer exist (the kernel dropped them; wd may be reused)."""
        for path in [p for p in self._watches if not os.path.exists(p)]:
            self.unwatch(path)

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Until an inotify event, ``stop``, or ``timeout`` seconds."""
        if self._event.is_set():
            self._event.clear()
            return
        waiter = asyncio.ensure_future(self._event.wait())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((waiter, stopper), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()
        self._event.clear()

    def close(self) -> None:
        if self._inotify is not None:
            try:
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            except RuntimeError:
                pass
            self._inotify.close()
            self._inotify = None
        self._watches.clear()
        self.active = False
