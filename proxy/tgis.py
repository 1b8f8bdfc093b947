"""TGI stream events -> TGIS ``GenerationResponse`` messages: stop reasons, token details, held-back stop text.

Pure helpers for the gRPC servicer; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from proxy.params import ResponseOptions
from proxy.pb.fmaas import generation_pb2 as pb

_FINISH_REASONS = {
    "length": pb.MAX_TOKENS,
    "eos_token": pb.EOS_TOKEN,
    "stop_sequence": pb.STOP_SEQUENCE,
}


def stop_reason(finish_reason: str | None, *, token_limited: bool = False) -> pb.StopReason:
    reason = _FINISH_REASONS.get(finish_reason or "", pb.NOT_FINISHED)
    if reason == pb.MAX_TOKENS and token_limited:
        return pb.TOKEN_LIMIT
    return reason


def matched_stop_sequence(text: str, stop_sequences: Sequence[str]) -> str:
    """Which stop sequence ended ``text`` (TGI includes it at the end); the longest match wins."""
    matches = [s for s in stop_sequences if s and text.endswith(s)]
    return max(matches, key=len) if matches else ""


def token_info(token: dict[str, Any], top_tokens: Iterable[dict[str, Any]] | None, options: ResponseOptions) -> Any:
    """A TGIS TokenInfo for one TGI token (rank only when it shows among the top tokens TGI returned)."""
    info = pb.TokenInfo(text="" if token.get("special") else token.get("text", ""))
    logprob = token.get("logprob")
    if options.token_logprobs and logprob is not None:
        info.logprob = logprob
    tops = list(top_tokens or ())
    if options.token_ranks:
        for i, t in enumerate(tops):
            if t.get("id") == token.get("id"):
                info.rank = i + 1
                break
    if options.top_n_tokens:
        for t in tops[: options.top_n_tokens]:
            top = info.top_tokens.add(text=t.get("text", ""))
            if t.get("logprob") is not None:
                top.logprob = t["logprob"]
    return info


def input_token_infos(tokens: Sequence[dict[str, Any]]) -> list[Any]:
    """TokenInfo for input tokens from TGI's /tokenize (texts only: TGI does not stream prefill logprobs)."""
    return [pb.TokenInfo(text=t.get("text", "")) for t in tokens]


class StopTextHolder:
    """Streams text while holding back what could still turn out to be a stop sequence.

    Used only when the client asked to exclude stop sequences: TGI streams the stop sequence's tokens before it
    knows they complete one, so the tail that might be the start of a stop sequence is held until it is not.
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        self._stops = [s for s in stop_sequences if s]
        self._held = ""

    def feed(self, delta: str) -> str:
        text = self._held + delta
        keep = 0
        for s in self._stops:
            for k in range(min(len(s), len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def finish(self, stop_sequence: str) -> str:
        """The rest of the text at the end of the stream, minus the stop sequence that ended it."""
        text, self._held = self._held, ""
        if stop_sequence and text.endswith(stop_sequence):
            return text[: -len(stop_sequence)]
        return text
