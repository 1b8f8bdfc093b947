"""A deterministic, invertible word tokenizer for the reference backend: no download, real token counts.

The GPU machine has no tokenizer files and cannot fetch any, and a random-init model speaks no language anyway. What
the gateway needs from a backend's tokenizer is token counts (prompt lengths for shaping, limits, billing) and token
texts (the stream). This tokenizer gives both, deterministically, for any vocabulary size of at least 512:

- **Pieces.** Text is cut exactly as ``sim.tokenizer.pieces`` cuts it (GPT-2-style pre-tokenization: a word with its
  leading space, one punctuation mark with its leading space, runs of whitespace; pieces longer than 4 characters
  cut into 4-character pieces). So a prompt counts the same number of tokens here as on the simulator, and
  ``sim.validation.validate`` (TGI's checks and messages) computes the same ``input_length`` as ``encode``.
- **Ids.** The top 256 ids are special, like Llama-3's: ``regular`` (= vocab_size - 256) is ``<|begin_of_text|>``
  (BOS, prepended when ``add_special_tokens``), ``regular + 1`` is ``<|end_of_text|>`` (EOS), the rest are
  ``<|reserved_special_token_k|>``. Every regular id ``i`` has a canonical text: a space and three characters of
  ``[0-9A-Z_a-z]`` spelling ``i`` in base 63 (``" 000"`` is 0, ``" 001"`` is 1, ...). A canonical piece encodes
  to its id; any other piece to ``crc32(piece) % regular``.
- **Inverse.** ``decode`` maps ids back to their texts. Generated text is a run of canonical pieces, so
  ``encode(decode(ids), add_special_tokens=False) == ids`` for regular ids: retokenizing a model's output gives its
  token count back, as with a real tokenizer. Special ids are left out of decoded text, as TGI decodes with
  ``skip_special_tokens``.

Offsets are UTF-8 byte offsets, as TGI's ``/tokenize`` reports them; BOS has empty offsets (0, 0).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from sim.tokenizer import TokenSpan, count_tokens, pieces

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"  # ASCII \w, in code point order
BASE = len(ALPHABET)  # 63
DIGITS = 3
MAX_REGULAR = BASE**DIGITS  # 250,047 canonical texts
SPECIAL_IDS = 256  # Llama-3 reserves its top 256 ids for special tokens
_DIGIT = {c: i for i, c in enumerate(ALPHABET)}

__all__ = ["TokenSpan", "WordTokenizer"]


@dataclass(frozen=True, slots=True)
class TokenText:
    """How one id reads: its text and whether it is a special token."""

    text: str
    special: bool


class WordTokenizer:
    """The tokenizer of a model with ``vocab_size`` ids (Llama-3: 128,256)."""

    def __init__(self, vocab_size: int) -> None:
        regular = vocab_size - SPECIAL_IDS
        if regular < SPECIAL_IDS:
            raise ValueError(f"vocab_size must be at least {2 * SPECIAL_IDS}, got {vocab_size}")
        if regular > MAX_REGULAR:
            raise ValueError(f"vocab_size must be at most {MAX_REGULAR + SPECIAL_IDS}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.regular = regular
        self.bos_id = regular
        self.eos_id = regular + 1
        self._texts = [TokenText(self._canonical(i), False) for i in range(regular)]
        self._texts.append(TokenText("<|begin_of_text|>", True))
        self._texts.append(TokenText("<|end_of_text|>", True))
        self._texts.extend(TokenText(f"<|reserved_special_token_{k}|>", True) for k in range(SPECIAL_IDS - 2))

    @staticmethod
    def _canonical(i: int) -> str:
        chars = []
        for _ in range(DIGITS):
            i, digit = divmod(i, BASE)
            chars.append(ALPHABET[digit])
        return " " + "".join(reversed(chars))

    def piece_id(self, piece: str) -> int:
        """The id of one piece: its canonical id when it is one, else a stable hash into the regular ids."""
        if len(piece) == DIGITS + 1 and piece[0] == " ":
            value = 0
            for c in piece[1:]:
                digit = _DIGIT.get(c)
                if digit is None:
                    break
                value = value * BASE + digit
            else:
                if value < self.regular:
                    return value
        return zlib.crc32(piece.encode("utf-8")) % self.regular

    def encode(self, text: str, add_special_tokens: bool = True) -> list[TokenSpan]:
        """Tokens of ``text`` with their UTF-8 byte offsets (BOS first when ``add_special_tokens``)."""
        tokens: list[TokenSpan] = []
        if add_special_tokens:
            tokens.append(TokenSpan(id=self.bos_id, text=self._texts[self.bos_id].text, start=0, stop=0, special=True))
        offset = 0
        for piece in pieces(text):
            width = len(piece.encode("utf-8"))
            tokens.append(TokenSpan(id=self.piece_id(piece), text=piece, start=offset, stop=offset + width))
            offset += width
        return tokens

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [t.id for t in self.encode(text, add_special_tokens)]

    @staticmethod
    def count(text: str, add_special_tokens: bool = True) -> int:
        """``len(encode(text, add_special_tokens))`` without building the tokens."""
        return count_tokens(text, add_special_tokens)

    def token(self, token_id: int) -> TokenText:
        """The text of an id the model generated."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary (0..{self.vocab_size - 1})")
        return self._texts[token_id]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        texts = self._texts
        return "".join(texts[i].text for i in ids if not (skip_special_tokens and texts[i].special))

    def prompt(self, n_tokens: int, salt: int = 0) -> str:
        """A text of exactly ``n_tokens`` tokens with BOS (``n_tokens - 1`` canonical pieces), distinct per ``salt``,
        for benchmarks that need prompts of a known length which share no prefix."""
        if n_tokens < 1:
            raise ValueError("a prompt has at least the BOS token")
        start = (salt * 7919) % self.regular
        return "".join(self._texts[(start + k * 31) % self.regular].text for k in range(n_tokens - 1))
