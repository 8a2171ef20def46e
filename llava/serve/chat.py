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

import logging
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_PLACEHOLDER
from llava.conversation import SeparatorStyle, get_conv_template
from llava.mm_utils import tokenizer_image_token
from llava.preflight import check_generation_options, check_prompt_fits, model_max_positions
from llava.processor import LlavaProcessor, place_images

logger = logging.getLogger(__name__)


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
    # the compiled path (llava.model.compiled.CompiledLlava): the conversation lives in a static KV cache
    # of `max_cache_len` slots, one graph per prefill bucket and one for the decode step; prefills are
    # padded to buckets, so give it room beyond the positions (llava.serve.cli gives twice the model's)
    compiled: object = None
    max_cache_len: int = 2048

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
        processor = LlavaProcessor(self.tokenizer, self.image_processor, self.model.config, self.conv_mode,
                                   device=self.device, dtype=self.model.get_input_embeddings().weight.dtype)
        pixels = processor.image_pixels([image])
        # on the compiled path the image's stages 1-2 (tower, compression, projector) run as its captured graph
        project_views = None if self.compiled is None else self.compiled.project_views
        with torch.no_grad():
            self.image_features = self.model.get_image_features(
                pixels, [image.size], project_views=project_views).per_image
        self.image_encodes += 1
        self.image = image
        self.conv = get_conv_template(self.conv_mode)
        self.cache, self.cached_ids, self.cached_prompt_ids = None, [], None

    def _image_token(self) -> str:
        return LlavaProcessor(self.tokenizer, self.image_processor, self.model.config, self.conv_mode).image_token

    def _stop_text(self) -> str:
        if self.conv.sep_style == SeparatorStyle.TWO:
            return self.conv.sep2
        return self.conv.sep

    def _token_ids(self, prompt: str) -> list[int]:
        return tokenizer_image_token(prompt, self.tokenizer)

    def _embed(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, L, hidden) embeddings of ``ids`` with the encoded image spliced in where it is referenced, and
        the (1, L) mask of its visual tokens (None when the turn has no image): in-LLM methods prune among
        them in the turn that reads the image."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        if self.image_features is not None and any(i < 0 for i in ids):
            # the prompt's host copy: the splice reads its width on the host (no device read)
            spliced = self.model.splice_image_features(input_ids, None, None, None, self.image_features,
                                                       host_input_ids=torch.tensor([ids], dtype=torch.long))
            return spliced.inputs_embeds, spliced.visual_mask
        return self.model.get_input_embeddings()(input_ids), None

    def ask(self, text: str, max_new_tokens: int = 512, temperature: float = 0.0, stream=None) -> str:
        """One turn: the user's ``text`` -> the assistant's reply. ``stream(new_text)`` sees it grow."""
        if self.image is None:
            raise ValueError("set_image() first: the chat is about an image")
        check_generation_options(temperature, None, 1, max_new_tokens)
        first_turn = len(self.conv.messages) == 0
        if first_turn:
            text = place_images(text, self._image_token(), 1)  # an explicit <image> is accepted
        elif DEFAULT_IMAGE_TOKEN in text or IMAGE_PLACEHOLDER in text:
            raise ValueError(f"the chat is about one image: {DEFAULT_IMAGE_TOKEN} belongs in the first message only")
        self.conv.append_message(self.conv.roles[0], text)
        self.conv.append_message(self.conv.roles[1], None)
        prompt_ids = self._token_ids(self.conv.get_prompt())

        previous = self.cached_prompt_ids
        reuse = previous is not None and prompt_ids[: len(previous)] == previous
        new_ids = prompt_ids[len(previous) :] if reuse else prompt_ids
        try:
            # [VisionZip-LLaVA] the original cut the first prompt at tokenizer_model_max_length and kept
            # reusing the cache as if nothing was cut; here a turn that does not fit is refused (the
            # conversation stays as it was) and a reply stops where the model's positions end.
            allowed = self._room_for_reply(new_ids, reuse, max_new_tokens)
        except ValueError:
            del self.conv.messages[-2:]
            raise
        if not reuse:
            self.cache, self.cached_ids = self._new_cache(), []
        cached_before = self.cache.get_seq_length()
        logits = self._forward(new_ids)
        prefill = self.cache.get_seq_length() - cached_before
        reply_ids = self._generate(logits, allowed, temperature, stream)
        if allowed < max_new_tokens and len(reply_ids) == allowed:
            logger.warning(
                "reply stopped after %d tokens: the conversation reached the model's %d positions; start a new "
                "conversation to continue", allowed, self.max_positions(),
            )
        self.turns.append(TurnStats(prefill, len(reply_ids), reuse))

        reply = self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()
        stop = self._stop_text()
        if stop and reply.endswith(stop):
            reply = reply[: -len(stop)].strip()
        self.conv.messages[-1][1] = reply
        self._close_turn(reply_ids)
        return reply

    def max_positions(self) -> int | None:
        """Positions the conversation may take: the model's (``llava.preflight.model_max_positions``), and
        the static cache's size on the compiled path."""
        limit = model_max_positions(self.model.config)
        if self.compiled is not None:
            limit = self.max_cache_len if limit is None else min(limit, self.max_cache_len)
        return limit

    def _room_for_reply(self, new_ids: list[int], reuse: bool, max_new_tokens: int) -> int:
        """New tokens the reply may have so that the cache never passes ``max_positions``; a ValueError
        naming the lengths when the prompt itself does not fit."""
        visual = int(self.image_features[0].shape[0]) if self.image_features is not None else 1
        images = sum(1 for i in new_ids if i < 0)
        cached = self.cache.get_seq_length() if reuse and self.cache is not None else 0
        stop_ids = self.tokenizer(self._stop_text(), add_special_tokens=False).input_ids if self._stop_text() else []
        positions = cached + len(new_ids) + images * (visual - 1) + len(stop_ids)
        what = f"conversation ({cached} positions cached + {positions - cached} for this turn)"
        return check_prompt_fits(positions, max_new_tokens, self.max_positions(), what)

    def _close_turn(self, reply_ids: list[int]) -> None:
        """Make the cache end where the template's prompt of the finished exchange ends: feed the stop
        separator if the reply did not end with it, and remember that prompt's tokenization."""
        stop_ids = self.tokenizer(self._stop_text(), add_special_tokens=False).input_ids if self._stop_text() else []
        if stop_ids and reply_ids[-len(stop_ids) :] != stop_ids:
            self._forward(stop_ids)
        self.cached_prompt_ids = self._token_ids(self.conv.get_prompt())

    def _new_cache(self):
        if self.compiled is None:
            return DynamicCache(config=self.model.config)
        return self.compiled.session(batch=1, max_cache_len=self.max_cache_len)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Read ``ids`` into the cache; the logits of the last position."""
        if self.compiled is not None:
            with torch.no_grad():
                logits = self.cache.feed(self._embed(ids)[0])
            self.cached_ids.extend(ids)
            return logits[0]
        with torch.no_grad():
            embeds, visual_mask = self._embed(ids)
            extra = {} if visual_mask is None else {"visual_mask": visual_mask}
            out = self.model(inputs_embeds=embeds, cache=self.cache, use_cache=True, **extra)
        self.cache = out.cache
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
