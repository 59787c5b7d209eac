"""Cancel requests shared by the instances of the ``llm`` model in one Triton.

The gateway ends a request whose client left with a cancel request on the same gRPC call
(trident.contract CANCEL_PARAMETER, naming the request's cancel token). With several instances
of ``llm`` (config.pbtxt ``instance_group`` count above 1: one stub process each, so that the
model's per-token work uses more than one core), Triton hands the cancel request to any instance,
often not the one that holds the request. The instance that finds no request with that token
posts the token here; every instance reads the board on each turn of its cancellation watcher
(every ``cancel_check_interval`` / 2) and ends its own request with that token.

The board is a directory with one empty file per token, on ``/dev/shm`` where it exists (no
disk writes), named after the Triton process (the stubs' parent), so that the instances of one
server share it and two servers do not. A token stays posted for ``keep`` seconds (the request it
names may not have arrived yet); whoever reads the board removes what is older. Tokens that are
not plain file names (a direct gRPC client may send anything) are not posted: the instance that
holds such a request still ends it when its call is cancelled (``is_cancelled``).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Optional

#: Environment variable naming the board's directory (default: :func:`default_directory`).
CANCEL_DIR_ENV = "TRIDENT_LLM_CANCEL_DIR"
_TOKEN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
#: The default board's name: the Triton process (the stubs' parent) and the model.
_NAME = "trident-cancels-{pid}-{model}"
_NAME_PATTERN = re.compile(r"trident-cancels-(\d+)-(.+)")


def default_directory(model_name: str, environ: Mapping[str, str] = os.environ) -> Path:
    """:data:`CANCEL_DIR_ENV`, else a directory per Triton process (the parent of every stub of
    the model) and model, in ``/dev/shm`` (or the temporary directory where there is none)."""
    if environ.get(CANCEL_DIR_ENV):
        return Path(environ[CANCEL_DIR_ENV])
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return base / _NAME.format(pid=os.getppid(), model=model_name)


def remove_stale(directory: Path) -> list[Path]:
    """Remove the boards beside :func:`default_directory`'s ``directory`` that belonged to Triton
    processes that are gone (a killed server never unloads its models, so nothing removed
    them); returns what was removed."""
    match = _NAME_PATTERN.fullmatch(directory.name)
    if match is None:
        return []
    removed = []
    for other in directory.parent.glob(_NAME.format(pid="*", model=match.group(2))):
        found = _NAME_PATTERN.fullmatch(other.name)
        if found is None or found.group(2) != match.group(2) or other == directory or _alive(int(found.group(1))):
            continue
        shutil.rmtree(other, ignore_errors=True)
        removed.append(other)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def postable(token: str) -> bool:
    return bool(_TOKEN.fullmatch(token))


class CancelBoard:
    """One model's board of posted cancel tokens, shared by its instances (see the module)."""

    def __init__(self, directory: Path, *, keep: float, clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.keep = keep
        self.clock = clock  # wall time: compared with the files' mtimes
        self.directory.mkdir(parents=True, exist_ok=True)

    def post(self, token: str) -> bool:
        """Post ``token`` for the other instances; False when it cannot be (not a file name)."""
        if not postable(token):
            return False
        path = self.directory / token
        try:
            path.touch()
        except FileNotFoundError:  # an instance that unloaded removed the empty directory
            self.directory.mkdir(parents=True, exist_ok=True)
            path.touch()
        now = self.clock()
        try:
            os.utime(path, (now, now))
        except FileNotFoundError:  # already found and taken by the instance that holds the request
            pass
        return True

    def posted(self) -> set[str]:
        """The tokens posted in the last ``keep`` seconds; older ones are removed."""
        tokens: set[str] = set()
        oldest = self.clock() - self.keep
        try:
            entries = list(os.scandir(self.directory))
        except FileNotFoundError:  # removed under us (a server stopping): nothing is posted
            return tokens
        for entry in entries:
            try:
                if entry.stat().st_mtime < oldest:
                    os.unlink(entry.path)
                    continue
            except FileNotFoundError:  # taken by another instance meanwhile
                continue
            tokens.add(entry.name)
        return tokens

    def has(self, token: Optional[str]) -> bool:
        """``token`` is posted (a cancel request for it reached another instance first)."""
        if token is None or not postable(token):
            return False
        try:
            return os.stat(self.directory / token).st_mtime >= self.clock() - self.keep
        except FileNotFoundError:
            return False

    def take(self, token: str) -> None:
        """The request ``token`` names has been found and ended: remove the post."""
        try:
            os.unlink(self.directory / token)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Remove the directory when no post is left in it (another instance may still use it)."""
        try:
            self.directory.rmdir()
        except OSError:
            pass
