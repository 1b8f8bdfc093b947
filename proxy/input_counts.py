"""Input token counts for TGIS's first stream message, without a backend round trip where one can be avoided.

TGIS sends a prompt's input token count *first*; TGI tells it only with its last event. The count is informative:
billing takes the prompt count from the backend's own stream (``proxy.gateway``), so a wrong count here changes
what a client reads, never a bill. Two sources, in order:

1. **the model's own tokenizer**, when ``[[models]] tokenizer_file`` names the ``tokenizer.json`` its backends load
   (what TGI's ``/tokenize`` itself runs: the same file gives the same count, BOS included, as TGI adds special
   tokens by default). Counted on the event loop, so only prompts up to ``LOCAL_MAX_CHARS`` (a Rust encode of that
   size takes well under a millisecond); a longer prompt is counted by the backend, off this process's CPU;
2. **recent ``/tokenize`` answers**, bounded (oldest out first); prompts over ``CACHED_MAX_CHARS`` are never kept.

Either gives ``None`` when it does not know: the caller then asks the backend's ``/tokenize`` beside the stream.
"""

from __future__ import annotations

from pathlib import Path

import structlog
from tokenizers import Tokenizer

from common.errors import ConfigError

log = structlog.get_logger(__name__)

CACHED_PROMPTS = 4096  # prompts whose /tokenize counts are kept
CACHED_MAX_CHARS = 16_384  # a longer prompt is counted by the backend every time: the cache stays small
LOCAL_MAX_CHARS = 2048  # a longer prompt is not tokenized on the event loop (~0.5 ms at this size)


def _truncated(count: int, truncate: int) -> int:
    """TGI keeps the last ``truncate`` tokens of a longer input (0: no truncation)."""
    return min(count, truncate) if truncate > 0 else count


def load_tokenizer(path: Path, where: str) -> Tokenizer:
    """A Hugging Face ``tokenizer.json``, or a ConfigError naming the setting (``where``) and what is wrong.

    Padding and truncation a file may carry are turned off: they would pad or cap every count (models ship files
    with either set), and TGI truncates per request, as ``get`` does."""
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises bare Exception for unreadable or malformed files
        raise ConfigError(f"{where}: cannot load {path} as a Hugging Face tokenizer.json ({exc})") from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class InputCounts:
    """Per model: its tokenizer when configured, and the backend's counts of recent prompts."""

    __slots__ = ("_cached", "_cached_max_chars", "_local_max_chars", "_size", "_tokenizers")

    def __init__(
        self,
        tokenizers: dict[str, Tokenizer] | None = None,
        *,
        size: int = CACHED_PROMPTS,
        cached_max_chars: int = CACHED_MAX_CHARS,
        local_max_chars: int = LOCAL_MAX_CHARS,
    ) -> None:
        self._tokenizers = dict(tokenizers or {})
        self._cached: dict[tuple[str, str], int] = {}
        self._size = size
        self._cached_max_chars = cached_max_chars
        self._local_max_chars = local_max_chars

    def get(self, model_id: str, text: str, truncate: int) -> int | None:
        """The count TGI's ``/tokenize`` would give, truncated as TGI truncates, or None when not known here."""
        if self.tokenizes(model_id, text):
            n = self.count(model_id, text, truncate)
            if n is not None:
                return n
        return self.cached(model_id, text, truncate)

    def tokenizes(self, model_id: str, text: str) -> bool:
        """Whether ``count`` answers for ``text``: the model has a tokenizer here and the text is short enough."""
        return model_id in self._tokenizers and len(text) <= self._local_max_chars

    def count(self, model_id: str, text: str, truncate: int) -> int | None:
        """The model's tokenizer's count (only where ``tokenizes``): tens of microseconds of CPU, so a caller may
        run it while it waits for something else. None (and a log line) when the tokenizer fails: the count is
        informative, and the caller falls back as it does when nothing here knows it."""
        try:
            encoding = self._tokenizers[model_id].encode(text)
        except Exception as exc:  # the tokenizers library raises bare Exceptions
            log.warning("input_count_failed", model=model_id, error=f"{type(exc).__name__}: {exc}")
            return None
        return _truncated(len(encoding), truncate)

    def cached(self, model_id: str, text: str, truncate: int) -> int | None:
        """A recent ``/tokenize`` answer's count, or None."""
        n = self._cached.get((model_id, text))
        return None if n is None else _truncated(n, truncate)

    def put(self, model_id: str, text: str, count: int) -> None:
        """Keep the backend's (untruncated) count of ``text``."""
        if len(text) > self._cached_max_chars:
            return
        cached, key = self._cached, (model_id, text)
        if key not in cached and len(cached) >= self._size:
            del cached[next(iter(cached))]
        cached[key] = count
