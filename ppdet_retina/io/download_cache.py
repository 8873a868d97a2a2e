"""Weights by path or URL: an http(s) ``weights`` / ``pretrain_weights`` becomes a cached local file.

Files go to PaddleDetection's cache, ``~/.cache/paddle/weights/<file name>`` (the URL's last path
segment), so a file PaddleDetection downloaded before is reused; ``$PPDET_WEIGHTS_HOME`` moves the
cache (PaddleDetection itself has no such variable). A cached file is used as is, without the network.

A download is written to ``<file>.part.<host>.<pid>`` and renamed when it is complete: its length
matches the server's Content-Length and ``paddle.load`` reads it. A dropped connection, a short or
unreadable file or a server error is retried a few times; a 4xx answer is not. Processes that share the cache folder
(the ranks on one machine) take an ``fcntl`` lock on ``<file>.lock``: one downloads, the others wait
and then find the finished file.

Why not ``paddle.utils.download.get_path_from_url``: it caches under ``~/.cache/paddle/hapi/weights``,
checks md5 sums rather than length and loadability, uses one fixed temporary name (two processes on a
machine race on it) and coordinates ranks by trainer endpoints only. What it shares with this module
(retries, progress) is small, so the download itself is a few lines of ``urllib``.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterator, Optional

__all__ = ["WEIGHTS_HOME_ENV", "WeightsDownloadError", "is_url", "weights_home", "cache_path",
           "resolve_weights"]

logger = logging.getLogger("ppdet_retina.io.download_cache")

WEIGHTS_HOME_ENV = "PPDET_WEIGHTS_HOME"
_DEFAULT_HOME = os.path.join("~", ".cache", "paddle", "weights")
_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 2.0


class WeightsDownloadError(FileNotFoundError):
    """A weights URL could not be turned into a good local file; the message says what to do.

    A FileNotFoundError, so tools report it like a missing local file (one ``error:`` line, exit 2).
    """


class _BadDownload(Exception):
    """One attempt failed in a way worth retrying (short, unreadable, dropped, server error)."""


def is_url(path: object) -> bool:
    return isinstance(path, str) and path.lower().startswith(("http://", "https://"))


def weights_home() -> str:
    """The cache folder: ``$PPDET_WEIGHTS_HOME`` or ``~/.cache/paddle/weights``."""
    return os.path.abspath(os.path.expanduser(os.environ.get(WEIGHTS_HOME_ENV) or _DEFAULT_HOME))


def cache_path(url: str) -> str:
    """Where ``url`` is cached: the cache folder plus the URL's file name (query string dropped)."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise WeightsDownloadError(f"weights URL '{url}' does not end in a file name")
    return os.path.join(weights_home(), name)


def resolve_weights(path: str, what: str = "weights", retries: int = 3, timeout: float = 60.0,
                    retry_wait: float = 1.0) -> str:
    """A local path unchanged; an http(s) URL -> its cached file, downloading it once when needed.

    ``what`` is the config key the value came from (``weights`` / ``pretrain_weights``), used in
    messages. Raises :class:`WeightsDownloadError` after ``retries`` failed attempts (or at once for
    a 4xx answer), naming the URL, the cache path and how to place the file by hand.
    """
    if not is_url(path):
        return path
    target = cache_path(path)
    if os.path.isfile(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _download_lock(target):
        if os.path.isfile(target):  # another process finished it while this one waited
            logger.info(f"{what}: using {target}, downloaded by another process")
            return target
        _download_with_retries(path, target, what, retries, timeout, retry_wait)
    return target


@contextlib.contextmanager
def _download_lock(target: str) -> Iterator[None]:
    """Exclusive lock on ``<target>.lock`` for the processes sharing the cache (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: every process downloads to its own temp name; the rename is atomic
        yield
        return
    with open(target + ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(f"waiting for another process downloading {target}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_with_retries(url: str, target: str, what: str, retries: int, timeout: float,
                           retry_wait: float) -> None:
    reasons = []
    for attempt in range(1, max(1, retries) + 1):
        # Host and pid: processes of two machines sharing a cache folder never write the same temp file.
        tmp = f"{target}.part.{socket.gethostname()}.{os.getpid()}"
        try:
            _download_once(url, tmp, timeout)
            _check_loadable(tmp)
            os.replace(tmp, target)
            return
        except urllib.error.HTTPError as err:
            if 400 <= err.code < 500:  # the file is not there: asking again will not help
                raise WeightsDownloadError(_failure_message(url, target, what, f"HTTP {err.code} {err.reason}",
                                                            attempt)) from None
            reasons.append(f"HTTP {err.code} {err.reason}")
        except (_BadDownload, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            reasons.append(_reason(err))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.warning(f"{what}: download attempt {attempt}/{retries} of {url} failed: {reasons[-1]}")
        if attempt < retries:
            time.sleep(retry_wait * attempt)
    raise WeightsDownloadError(_failure_message(url, target, what, reasons[-1], len(reasons)))


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.URLError) and not isinstance(err, urllib.error.HTTPError):
        return f"cannot reach the server ({err.reason})"
    return str(err) or type(err).__name__


def _failure_message(url: str, target: str, what: str, reason: str, attempts: int) -> str:
    scratch = f", or train from scratch with -o {what}=" if what == "pretrain_weights" else ""
    return (f"cannot download {what} from '{url}' ({reason}; {attempts} attempt(s)). Download the file "
            f"on a machine with internet and place it at '{target}' (the cache; {WEIGHTS_HOME_ENV} moves "
            f"it), or pass a local file with -o {what}=<path>{scratch}.")


def _download_once(url: str, tmp: str, timeout: float) -> None:
    """Stream ``url`` into ``tmp``; _BadDownload when the body is shorter than Content-Length."""
    request = urllib.request.Request(url, headers={"User-Agent": "ppdet_retina"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        name = os.path.basename(tmp).split(".part.", 1)[0]
        progress = _Progress(name, total)
        received = 0
        with open(tmp, "wb") as out:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except Exception as err:  # http.client.IncompleteRead, resets, timeouts mid-body
                    raise _BadDownload(f"connection dropped after {received} bytes ({type(err).__name__})")
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                progress.update(received)
            out.flush()
            os.fsync(out.fileno())
        progress.done(received)
    if total is not None and received != total:
        raise _BadDownload(f"short download: {received} of {total} bytes")


def _check_loadable(file: str) -> None:
    import paddle

    try:
        state = paddle.load(file, return_numpy=True)
    except Exception as err:  # pickle and paddle raise many types; all mean a broken file
        raise _BadDownload(f"downloaded file does not load ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise _BadDownload(f"downloaded file holds a {type(state).__name__}, not a state dict")


class _Progress:
    """One log line every few seconds and one at the end: bytes so far, percent, speed."""

    def __init__(self, name: str, total: Optional[int], clock: Callable[[], float] = time.monotonic):
        self.name, self.total, self.clock = name, total, clock
        self.start = self.last = clock()

    def update(self, received: int) -> None:
        now = self.clock()
        if now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            logger.info(self.line(received, now))

    def done(self, received: int) -> None:
        logger.info(self.line(received, self.clock()))

    def line(self, received: int, now: float) -> str:
        speed = received / max(now - self.start, 1e-6)
        size = f"{_mb(received)}" + (f" / {_mb(self.total)} ({100.0 * received / max(self.total, 1):.0f}%)"
                                     if self.total else "")
        return f"downloading {self.name}: {size} at {_mb(speed)}/s"


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"
