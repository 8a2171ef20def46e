"""The Qwen-VL tokenizer: byte-level BPE from the checkpoint's ``qwen.tiktoken`` file, plus its special tokens.

Facts from the hub's ``tokenization_qwen.py`` (Qwen/Qwen-VL-Chat; read in the vendored copy
HyeonjeongHa/MM-PoisonRAG@ad21166 ``Qwen-VL-Chat/``, docs/qwen_vl.md):

- ``qwen.tiktoken``: one line per mergeable token, ``base64(bytes) rank``; ranks are the token ids;
- the pre-tokenizer is the regex ``PAT_STR`` below; text is NFC-normalised first;
- special tokens follow the mergeable ranks, in this order: ``<|endoftext|>``, ``<|im_start|>``,
  ``<|im_end|>``, ``<|extra_0|>`` .. ``<|extra_204|>``, then the image / grounding tags ``<ref>``, ``</ref>``,
  ``<box>``, ``</box>``, ``<quad>``, ``</quad>``, ``<img>``, ``</img>``, ``<imgpad>`` (151857 = ``<img>`` on
  the real vocabulary, the config's ``visual.image_start_id``);
- special tokens written in the text are recognised (``allowed_special="all"``).

Encoding is tiktoken's BPE (merge the adjacent pair of lowest rank until none is mergeable). The ``tiktoken``
package runs it natively when installed (an optional dependency, ``pip install tiktoken``: a real 151k-rank
file encodes much faster with it); without it the same algorithm runs here in Python, which gives the same
ids (the tiny test vocabularies use it). ``QwenTokenizer.from_pretrained(folder)`` reads the folder's
``qwen.tiktoken``; a clear error names the file when it is missing.

[VisionZip-LLaVA] the official tokenizer rewrites ``<img>PATH</img>`` into ``<img>`` + the path's bytes +
``<imgpad>`` padding up to the image span + ``</img>``, and the model decodes the path from the ids and opens
the file itself. Here the processor gives the pixels, and an image is written as ``<img>`` + the image
placeholder + ``</img>`` (``llava.model.qwen_vl.processor``); the model puts the image's visual tokens where the
placeholder is. The ids the LLM sees are the same (the official model overwrites the whole span with the image).
"""
from __future__ import annotations

import base64
import os
import unicodedata

import regex

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
IMSTART = "<|im_start|>"
IMEND = "<|im_end|>"
EXTRAS = tuple(f"<|extra_{i}|>" for i in range(205))
IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>")
SPECIAL_TOKENS = (ENDOFTEXT, IMSTART, IMEND) + EXTRAS + IMAGE_TAGS
IMAGE_START, IMAGE_END, IMAGE_PAD = "<img>", "</img>", "<imgpad>"


def load_ranks(path: str) -> dict[bytes, int]:
    """A ``qwen.tiktoken`` file -> {token bytes: rank}."""
    with open(path, "rb") as handle:
        contents = handle.read()
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines() if line)}


def save_ranks(ranks: dict[bytes, int], path: str) -> None:
    """{token bytes: rank} -> a ``qwen.tiktoken`` file (the hub format)."""
    with open(path, "w", encoding="utf-8") as handle:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            handle.write(base64.b64encode(token).decode("ascii") + " " + str(rank) + "\n")


def byte_pair_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's BPE on one pre-tokenized piece: start from single bytes, merge the adjacent pair whose
    concatenation has the lowest rank until no pair is a token; the parts' ranks are the ids."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return [ranks[part] for part in parts]


class QwenTokenizer:
    """Qwen(-VL) tokenizer over a ``qwen.tiktoken`` vocabulary (module docstring).

    ``encode(text)`` -> ids (special tokens in the text recognised); ``decode(ids, skip_special_tokens)``;
    ``batch_decode``. ``eod_id`` (``<|endoftext|>``) is the pad id, as in the official generation config.
    """

    def __init__(self, vocab_file: str, errors: str = "replace"):
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"no Qwen vocabulary at {vocab_file!r}: the checkpoint folder needs its {VOCAB_FILE}")
        self.vocab_file = vocab_file
        self.errors = errors
        self.mergeable_ranks = load_ranks(vocab_file)
        start = len(self.mergeable_ranks)
        self.special_tokens = {token: start + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.decoder: dict[int, bytes | str] = {rank: token for token, rank in self.mergeable_ranks.items()}
        self.decoder.update({index: token for token, index in self.special_tokens.items()})
        self._pattern = regex.compile(PAT_STR)
        self._special_pattern = regex.compile("|".join(regex.escape(t) for t in SPECIAL_TOKENS))
        self._native = self._tiktoken_encoding()
        self.eod_id = self.special_tokens[ENDOFTEXT]
        self.im_start_id = self.special_tokens[IMSTART]
        self.im_end_id = self.special_tokens[IMEND]
        self.img_start_id = self.special_tokens[IMAGE_START]
        self.img_end_id = self.special_tokens[IMAGE_END]
        self.img_pad_id = self.special_tokens[IMAGE_PAD]

    @classmethod
    def from_pretrained(cls, folder: str) -> QwenTokenizer:
        return cls(os.path.join(folder, VOCAB_FILE))

    def save_pretrained(self, folder: str) -> str:
        """Write ``qwen.tiktoken`` into ``folder`` (the special tokens follow from it); returns its path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, VOCAB_FILE)
        save_ranks(self.mergeable_ranks, path)
        return path

    def _tiktoken_encoding(self):
        try:
            import tiktoken
        except ImportError:  # optional: the Python BPE below gives the same ids
            return None
        return tiktoken.Encoding(
            "Qwen", pat_str=PAT_STR, mergeable_ranks=self.mergeable_ranks, special_tokens=self.special_tokens
        )

    # ----- sizes and ids ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.mergeable_ranks) + len(self.special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self)

    @property
    def pad_token_id(self) -> int:
        return self.eod_id

    @property
    def eos_token_id(self) -> int:
        return self.eod_id

    def convert_tokens_to_ids(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        rank = self.mergeable_ranks.get(token.encode("utf-8"))
        if rank is None:
            raise ValueError(f"{token!r} is not a token of {self.vocab_file}")
        return rank

    # ----- encoding -----------------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        if self._native is not None:
            return self._native.encode_ordinary(text)
        ids: list[int] = []
        for piece in self._pattern.findall(text):
            ids.extend(byte_pair_merge(piece.encode("utf-8"), self.mergeable_ranks))
        return ids

    def encode(self, text: str, allowed_special="all") -> list[int]:
        """Ids of ``text`` (NFC-normalised). ``allowed_special``: "all" (the official ``tokenize`` default) or
        the special tokens recognised when written in the text (``make_context`` allows the image tags only);
        the others are encoded as ordinary text, as tiktoken does with ``disallowed_special=()``."""
        text = unicodedata.normalize("NFC", text)
        ids: list[int] = []
        position = 0
        for match in self._special_pattern.finditer(text):
            if allowed_special != "all" and match.group() not in allowed_special:
                continue
            ids.extend(self._encode_ordinary(text[position : match.start()]))
            ids.append(self.special_tokens[match.group()])
            position = match.end()
        ids.extend(self._encode_ordinary(text[position:]))
        return ids

    # ----- decoding -----------------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list or a 1-D tensor); ids outside the vocabulary (the checkpoint's padded
        embedding rows, the image placeholder) are skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        text, pending = [], b""
        for index in ids:
            token = self.decoder.get(int(index))
            if token is None:
                continue
            if isinstance(token, str):
                if skip_special_tokens:
                    continue
                text.append(pending.decode("utf-8", errors=self.errors))
                pending = b""
                text.append(token)
            else:
                pending += token
        text.append(pending.decode("utf-8", errors=self.errors))
        return "".join(text)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]


def train_tiny_ranks(corpus: str, merges: int) -> dict[bytes, int]:
    """A small ``qwen.tiktoken`` vocabulary for tests: the 256 bytes, then ``merges`` BPE merges learned on
    ``corpus`` (pre-tokenized with ``PAT_STR``), deterministic (ties broken by the pair's bytes)."""
    ranks = {bytes([b]): b for b in range(256)}
    words: dict[tuple[bytes, ...], int] = {}
    for piece in regex.findall(PAT_STR, unicodedata.normalize("NFC", corpus)):
        key = tuple(bytes([b]) for b in piece.encode("utf-8"))
        words[key] = words.get(key, 0) + 1
    for _ in range(merges):
        counts: dict[tuple[bytes, bytes], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] = counts.get(pair, 0) + count
        if not counts:
            break
        pair = max(counts, key=lambda p: (counts[p], p[0] + p[1]))
        merged = pair[0] + pair[1]
        if merged in ranks:
            break
        ranks[merged] = len(ranks)
        new_words = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    return ranks
