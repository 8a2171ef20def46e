"""A multi-turn chat about one image that keeps the conversation in the KV cache.

The image is encoded (and compressed, when the model is configured so) once. Each turn feeds the model
only what is new: the first turn the whole prompt with the visual tokens spliced in; later turns the
tokens of the new user message and the assistant prefix, on top of the cached keys and values of
everything before (the visual tokens included), so the image is neither re-encoded nor re-read.

This works when the template's prompt of the conversation so far is a token prefix of the next prompt
(true for ``vicuna_v1``, ``llava_v1``, ``v1_mmtag``, ``plain``, ``chatml_direct`` and ``mpt``). Otherwise
(the ``llama_2`` styles rewrite earlier turns) a turn re-reads the conversation from the embeddings,
still reusing the encoded image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from llava.conversation import SeparatorStyle, get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token


@dataclass
class TurnStats:
    """What one turn cost: sequence positions read into the cache before the reply (prefill: the visual
    tokens count one by one) and tokens generated."""

    prefill_tokens: int
    generated_tokens: int
    reused_cache: bool


@dataclass
class ChatSession:
    model: object
    tokenizer: object
    image_processor: object
    conv_mode: str = "vicuna_v1"
    image_encodes: int = 0
    turns: list[TurnStats] = field(default_factory=list)

    def __post_init__(self):
        self.conv = get_conv_template(self.conv_mode)
        self.image = None
        self.image_features = None
        self.cache = None
        self.cached_ids: list[int] = []  # the token ids the cache holds (IMAGE_TOKEN_INDEX for the image)
        self.cached_prompt_ids: list[int] | None = None  # tokenization of the prompt the cache stands for

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def set_image(self, image) -> None:
        """Start a new conversation about ``image`` (a PIL image): encode it once."""
        pixels = process_images([image], self.image_processor, self.model.config)
        pixels = pixels[0].unsqueeze(0) if isinstance(pixels, list) else pixels
        with torch.no_grad():
            self.image_features = self.model.image_features_per_image(pixels.to(self.device), [image.size])
        self.image_encodes += 1
        self.image = image
        self.conv = get_conv_template(self.conv_mode)
        self.cache, self.cached_ids, self.cached_prompt_ids = None, [], None

    def _image_token(self) -> str:
        if getattr(self.model.config, "mm_use_im_start_end", False):
            return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
        return DEFAULT_IMAGE_TOKEN

    def _stop_text(self) -> str:
        if self.conv.sep_style == SeparatorStyle.TWO:
            return self.conv.sep2
        return self.conv.sep

    def _token_ids(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, self.tokenizer)

    def _embed(self, ids: list[int]) -> torch.Tensor:
        """(1, L, hidden) embeddings of ``ids`` with the encoded image spliced in where it is referenced."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.image_features is not None and any(i < 0 for i in ids):
            _, _, embeds, _ = self.model.splice_image_features(input_ids, None, None, None, self.image_features)
            return embeds
        return self.model.get_input_embeddings()(input_ids)

    def ask(self, text: str, max_new_tokens: int = 512, temperature: float = 0.0, stream=None) -> str:
        """One turn: the user's ``text`` -> the assistant's reply. ``stream(new_text)`` sees it grow."""
        if self.image is None:
            raise ValueError("set_image() first: the chat is about an image")
        first_turn = len(self.conv.messages) == 0
        if first_turn:
            text = self._image_token() + "\n" + text
        self.conv.append_message(self.conv.roles[0], text)
        self.conv.append_message(self.conv.roles[1], None)
        prompt_ids = self._token_ids(self.conv.get_prompt())

        previous = self.cached_prompt_ids
        reuse = previous is not None and prompt_ids[: len(previous)] == previous
        if reuse:
            new_ids = prompt_ids[len(previous) :]
        else:
            self.cache, self.cached_ids, new_ids = DynamicCache(config=self.model.config), [], prompt_ids
        cached_before = self.cache.get_seq_length()
        logits = self._forward(new_ids)
        prefill = self.cache.get_seq_length() - cached_before
        reply_ids = self._generate(logits, max_new_tokens, temperature, stream)
        self.turns.append(TurnStats(prefill, len(reply_ids), reuse))

        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        stop = self._stop_text()
        if stop and reply.endswith(stop):
            reply = reply[: -len(stop)].strip()
        self.conv.messages[-1][1] = reply
        self._close_turn(reply_ids)
        return reply

    def _close_turn(self, reply_ids: list[int]) -> None:
        """Make the cache end where the template's prompt of the finished exchange ends: feed the stop
        separator if the reply did not end with it, and remember that prompt's tokenization."""
        stop_ids = self.tokenizer(self._stop_text(), add_special_tokens=False).input_ids if self._stop_text() else []
        if stop_ids and reply_ids[-len(stop_ids) :] != stop_ids:
            self._forward(stop_ids)
        self.cached_prompt_ids = self._token_ids(self.conv.get_prompt())

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Read ``ids`` into the cache; the logits of the last position."""
        with torch.no_grad():
            out = self.model(inputs_embeds=self._embed(ids), past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.cached_ids.extend(ids)
        return out.logits[0, -1]

    def _generate(self, logits: torch.Tensor, max_new_tokens: int, temperature: float, stream) -> list[int]:
        stop_ids = self.tokenizer(self._stop_text(), add_special_tokens=False).input_ids if self._stop_text() else []
        eos = self.tokenizer.eos_token_id
        generated: list[int] = []
        shown = ""
        for _ in range(max_new_tokens):
            if temperature > 0:
                token = int(torch.multinomial(torch.softmax(logits.float() / temperature, dim=-1), 1))
            else:
                token = int(logits.argmax())
            generated.append(token)
            if stream is not None:
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                stream(text[len(shown) :])
                shown = text
            if token == eos or (stop_ids and generated[-len(stop_ids) :] == stop_ids):
                # the stop token is part of the exchange: read it into the cache too
                self._forward([token])
                break
            logits = self._forward([token])
        return generated
