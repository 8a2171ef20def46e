"""The LLaMA tokenizer LLaVA checkpoints were made with: SentencePiece itself, not a conversion of it.

The original LLaVA loads its tokenizer with ``use_fast=False``: the SentencePiece model runs as is, with
its own normalizer (e.g. ``nmt_nfkc`` turns "\\n" into a space). transformers 5 has no such LLaMA
tokenizer any more; its ``LlamaTokenizer`` is a ``tokenizers`` conversion, which drops the normalizer and
so produces other ids for the same prompt (the fixture's byte-fallback model tokenizes "\\n" as <0x0A>
instead of a space). ``LlavaLlamaTokenizer`` restores the SentencePiece behaviour:

- non-legacy prefix handling (``legacy: false`` in the checkpoints): one "▁" is put in front of the text,
  and text right after a special token (e.g. "</s>USER") gets no extra prefix space;
- BOS added in front (``add_bos_token``), no EOS (``add_eos_token``).
"""
from __future__ import annotations

import json
import os

from transformers import AutoTokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "▁"
TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
# tokenizer classes of LLaMA-family checkpoints whose tokenizer.model is the tokenizer the model knows
SENTENCEPIECE_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast", "LlavaLlamaTokenizer")


class LlavaLlamaTokenizer(SentencePieceBackend):
    """SentencePiece LLaMA tokenizer (the ``use_fast=False`` tokenizer of the original LLaVA)."""

    vocab_files_names = {"vocab_file": SENTENCEPIECE_MODEL}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool = False,
        add_prefix_space: bool = True,
        **kwargs,
    ):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.add_prefix_space = add_prefix_space
        pattern = {(True, False): "bos", (False, True): "eos", (True, True): "bos_eos", (False, False): "none"}
        kwargs.setdefault("special_tokens_pattern", pattern[(add_bos_token, add_eos_token)])
        kwargs.pop("tokenizer_class", None)
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=legacy,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = super().tokenize(text, **kwargs)
        # a lone prefix piece in front of a special token is not part of the text
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a plain ``LlamaTokenizer`` folder (tokenizer.model + config), which the original LLaVA,
        transformers 4.x and ``load_tokenizer`` all read."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(save_directory, TOKENIZER_CONFIG)
        with open(config_file, encoding="utf-8") as handle:
            config = json.load(handle)
        config["tokenizer_class"] = "LlamaTokenizer"
        for key in ("is_local", "local_files_only", "backend"):
            config.pop(key, None)
        with open(config_file, "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, sort_keys=True, ensure_ascii=False)
            handle.write("\n")
        return files

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """SentencePiece decoding of the ordinary pieces (byte fallback included), special tokens verbatim."""
        if tokens and self.add_prefix_space and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = [tokens[0][1:]] + list(tokens[1:])
        special = set(self.all_special_tokens)
        out, run = [], []
        for token in tokens:
            if token in special:
                out.append(self.sp_model.decode_pieces(run) if run else "")
                out.append(token)
                run = []
            else:
                run.append(token)
        if run:
            out.append(self.sp_model.decode_pieces(run))
        return "".join(out)


def load_tokenizer(path: str, **kwargs):
    """The tokenizer of a LLaVA checkpoint (or base language model) folder.

    A LLaMA-family tokenizer with a ``tokenizer.model`` loads as ``LlavaLlamaTokenizer`` (SentencePiece,
    as the original LLaVA's ``use_fast=False``); anything else through ``AutoTokenizer``.
    """
    config_file = os.path.join(path, TOKENIZER_CONFIG)
    spm_file = os.path.join(path, SENTENCEPIECE_MODEL)
    if os.path.isfile(config_file) and os.path.isfile(spm_file):
        with open(config_file, encoding="utf-8") as handle:
            tokenizer_class = json.load(handle).get("tokenizer_class")
        if tokenizer_class in SENTENCEPIECE_CLASSES:
            return LlavaLlamaTokenizer.from_pretrained(path, **kwargs)
    return AutoTokenizer.from_pretrained(path, **kwargs)
