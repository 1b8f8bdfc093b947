"""A tiny deterministic tokenizer and the small vocabulary the simulated model speaks.

Pieces follow GPT-2-style pre-tokenization (a word with its leading space, one punctuation mark with its leading
space, runs of whitespace); a piece longer than 4 characters is cut into 4-character pieces. Ids come from a stable
hash into Llama-3's regular id range, so the same text always has the same ids, across runs and machines. Offsets
are UTF-8 byte offsets, as TGI's ``/tokenize`` reports them (it slices ``input.bytes()``).

Special tokens mimic Llama-3: ``<|begin_of_text|>`` (added in front when ``add_special_tokens``, with empty offsets,
as HF tokenizers do) and ``<|end_of_text|>`` (the EOS the model may generate).

The generation vocabulary holds short words (each one piece, so tokenizing generated text gives back the generated
ids) and punctuation, each with a fixed logprob and its JSON pre-rendered for the streaming hot path.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass

PIECE_CHARS = 4
REGULAR_IDS = 128_000  # Llama-3: ids 0..127999 are regular tokens
BOS_ID = 128_000
BOS_TEXT = "<|begin_of_text|>"
EOS_ID = 128_001
EOS_TEXT = "<|end_of_text|>"

_PRE_TOKEN = re.compile(r" ?\w+| ?[^\w\s]|\s+(?!\S)|\s+")


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One token of an input: its id, its text and its UTF-8 byte offsets in the input."""

    id: int
    text: str
    start: int
    stop: int
    special: bool = False


def pieces(text: str) -> list[str]:
    """The token texts of ``text``, in order; they concatenate back to ``text``."""
    out: list[str] = []
    for word in _PRE_TOKEN.findall(text):
        if len(word) <= PIECE_CHARS:
            out.append(word)
        else:
            out.extend(word[i : i + PIECE_CHARS] for i in range(0, len(word), PIECE_CHARS))
    return out


def count_tokens(text: str, add_special_tokens: bool = True) -> int:
    """``len(encode(text, add_special_tokens))``, without building the tokens (validation's hot path)."""
    n = sum((len(word) + PIECE_CHARS - 1) // PIECE_CHARS for word in _PRE_TOKEN.findall(text))
    return n + (1 if add_special_tokens else 0)


_id_cache: dict[str, int] = {}


def token_id(piece: str) -> int:
    """The stable id of a regular token text."""
    tid = _id_cache.get(piece)
    if tid is None:
        tid = zlib.crc32(piece.encode("utf-8")) % REGULAR_IDS
        if len(_id_cache) < 1_000_000:
            _id_cache[piece] = tid
    return tid


def encode(text: str, add_special_tokens: bool = True) -> list[TokenSpan]:
    """Tokenize ``text`` like TGI's tokenizer call (BOS first when ``add_special_tokens``)."""
    tokens: list[TokenSpan] = []
    if add_special_tokens:
        tokens.append(TokenSpan(id=BOS_ID, text=BOS_TEXT, start=0, stop=0, special=True))
    offset = 0
    for piece in pieces(text):
        width = len(piece.encode("utf-8"))
        tokens.append(TokenSpan(id=token_id(piece), text=piece, start=offset, stop=offset + width))
        offset += width
    return tokens


def hf_tokenizer_json() -> str:
    """This tokenizer as a Hugging Face ``tokenizer.json`` that counts as ``count_tokens`` does, for a gateway's
    ``tokenizer_file`` in front of the simulator (as a real deployment names the file its TGI loads).

    The same pre-tokenization regex, then a split into pieces of at most ``PIECE_CHARS`` characters, each piece one
    token (a vocabulary of only ``<unk>``: ids and texts differ from ``encode``'s, counts do not), BOS in front.
    Oniguruma's ``\\w`` is Python's for letters, digits and ``_`` of every script; the two differ on a few
    categories (combining marks, superscript digits, some letter-like symbols), where counts may then differ.
    """
    bos = {"SpecialToken": {"id": BOS_TEXT, "type_id": 0}}
    spec: dict[str, object] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": _PRE_TOKEN.pattern}, "behavior": "Isolated", "invert": False},
                {
                    "type": "Split",
                    "pattern": {"Regex": rf"[\s\S]{{1,{PIECE_CHARS}}}"},
                    "behavior": "Isolated",
                    "invert": False,
                },
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS_TEXT: {"id": BOS_TEXT, "ids": [BOS_ID], "tokens": [BOS_TEXT]}},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0}, "unk_token": "<unk>"},
    }
    return json.dumps(spec)


def decode(ids_texts: list[tuple[int, str]], skip_special_tokens: bool = True) -> str:
    """Concatenate token texts, leaving special tokens out like ``skip_special_tokens=True``."""
    return "".join(text for tid, text in ids_texts if not (skip_special_tokens and tid >= REGULAR_IDS))


# --- what the simulated model generates ---

_WORD_TEXT = (
    "the a of to in is it and for on was we he she you are can but not all one new now how why may any our out day "
    "way use two see get has had his her its who did yes no so up do go by at as or an be if my me us am low big red "
    "sun sky sea air GPU run set add end few old own off per far ask try let put say too yet via job key map net "
    "bit log max min sum top raw hot fan"
)
_WORDS = tuple(_WORD_TEXT.split())
_PUNCT = (".", ",", ";", ":", "!", "?")


@dataclass(frozen=True, slots=True)
class VocabEntry:
    """A token the simulated model can generate."""

    id: int
    text: str
    logprob: float
    special: bool
    json: bytes  # the Token object as TGI serializes it: {"id":..,"text":..,"logprob":..,"special":..}


def _entry(tid: int, text: str, logprob: float, special: bool) -> VocabEntry:
    body = {"id": tid, "text": text, "logprob": logprob, "special": special}
    return VocabEntry(tid, text, logprob, special, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())


def _build_vocab() -> tuple[VocabEntry, ...]:
    texts = [" " + w for w in _WORDS] + list(_PUNCT)
    entries = [_entry(token_id(t), t, -round(0.05 + (i % 37) * 0.11, 2), False) for i, t in enumerate(texts)]
    entries.append(_entry(EOS_ID, EOS_TEXT, -0.02, True))
    return tuple(entries)


VOCAB: tuple[VocabEntry, ...] = _build_vocab()
EOS_INDEX = len(VOCAB) - 1  # the EOS entry is last; indices below it are regular tokens
REGULAR_VOCAB_SIZE = EOS_INDEX
