"""Conversations to token ids and labels, with the loss on exactly the assistant replies.

One routine serves every conversation template: the conversation is cut into *segments* (prompt text the
model reads, reply text it learns to write, each reply including the template's stop string such as
``</s>``), each segment is tokenized on its own, and the labels are the ids of the reply segments.

[VisionZip-LLaVA] The original LLaVA (``preprocess_v1``) tokenizes the whole prompt and then recovers
the reply positions by re-tokenizing each round and subtracting lengths, which assumes how the tokenizer
splits ``ASSISTANT:`` and ``</s>``: with other tokenizers (the tiny fixture's, for one) the ``:`` ends
up in the labels and multi-turn samples are masked out entirely ("tokenization mismatch"). Here the reply
positions are known by construction. Segments are cut where tokenization cannot merge across the cut:
before a reply (which starts with a space) and after a special token (``</s>``, tokenized with that
token as left context so that, as in the whole prompt, no extra prefix space appears). The whole prompt is
also tokenized once to check that the pieces add up to it (``check_tokenization``).
"""
from __future__ import annotations

from dataclasses import dataclass

from llava.constants import (
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)
from llava.conversation import Conversation, SeparatorStyle
from llava.mm_utils import tokenizer_image_token

# Speaker names in the LLaVA data files -> index into a template's ``roles``.
SPEAKERS = {"human": 0, "gpt": 1}


class SampleError(ValueError):
    """A training sample that cannot be used; the message names the sample."""

    def __init__(self, sample: str, reason: str, kind: str = "format"):
        super().__init__(f"{sample}: {reason}")
        self.sample = sample
        self.reason = reason
        self.kind = kind


class UnlearnableSample(SampleError):
    """A well-formed sample that would teach nothing or the wrong thing (no reply tokens left after
    truncation, a special token inside a reply, pieces that do not add up to the prompt). The training
    loop skips (and counts) or stops on these, as ``bad_sample_policy`` says."""


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    prompt: str


def conversation_turns(conversations, sample: str) -> list[tuple[int, str]]:
    """(speaker index, text) turns of a LLaVA-format ``conversations`` list, checked: human and gpt
    alternate, starting with human (a leading gpt turn is dropped, as the original does)."""
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample, f"'conversations' must be a non-empty list, got {conversations!r:.80}")
    turns = []
    for position, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SampleError(sample, f"turn {position} must be an object with 'from' and 'value', got {turn!r:.80}")
        speaker, text = turn["from"], turn["value"]
        if speaker not in SPEAKERS:
            raise SampleError(sample, f"turn {position} comes from {speaker!r}; expected one of {sorted(SPEAKERS)}")
        if not isinstance(text, str):
            raise SampleError(sample, f"turn {position} 'value' must be a string, got {type(text).__name__}")
        turns.append((SPEAKERS[speaker], text))
    if turns[0][0] != 0:
        turns = turns[1:]
    for position, (speaker, _text) in enumerate(turns):
        if speaker != position % 2:
            raise SampleError(sample, "turns must alternate human / gpt starting with human")
    if not any(speaker == 1 for speaker, _text in turns):
        raise SampleError(sample, "no gpt turn: nothing to learn")
    return turns


def place_image_token(turns: list[tuple[int, str]], has_image: bool, sample: str, image_text: str):
    """Check the ``<image>`` placeholder and put it where LLaVA puts it: at the start of its turn,
    followed by a newline, written as ``image_text`` (the processor's ``image_token``: ``<image>``, or
    wrapped in ``<im_start>``/``<im_end>``)."""
    count = sum(text.count(DEFAULT_IMAGE_TOKEN) for _speaker, text in turns)
    if count > 1:
        raise SampleError(
            sample, f"{count} {DEFAULT_IMAGE_TOKEN} placeholders; one image per sample is supported"
        )
    if has_image and count == 0:
        raise SampleError(sample, f"has an 'image' but no {DEFAULT_IMAGE_TOKEN} placeholder in its text")
    if not has_image and count:
        raise SampleError(sample, f"has a {DEFAULT_IMAGE_TOKEN} placeholder but no 'image'")
    if not has_image:
        return turns
    placed = []
    for speaker, text in turns:
        if DEFAULT_IMAGE_TOKEN in text:
            if speaker != 0:
                raise SampleError(sample, f"the {DEFAULT_IMAGE_TOKEN} placeholder is in a gpt reply")
            text = image_text + "\n" + text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        placed.append((speaker, text))
    return placed


def conversation_segments(turns: list[tuple[int, str]], template: Conversation, sample: str) -> list[Segment]:
    """Cut the prompt the template writes for ``turns`` into prompt and reply segments.

    PLAIN (pre-training captions, LLaVA's ``plain``): the image alone, then caption + ``sep``.
    Other styles: the template renders the conversation; for each reply, the text up to the role prefix
    where the model starts writing (what ``get_prompt`` gives with an empty reply) is a prompt segment,
    and the rest up to and including the reply's separator is a reply segment.
    """
    if template.sep_style == SeparatorStyle.PLAIN:
        if len(turns) != 2:
            raise SampleError(sample, f"the plain template takes one human and one gpt turn, got {len(turns)} turns")
        image_text = turns[0][1].split("\n", 1)[0]
        if DEFAULT_IMAGE_TOKEN not in image_text:
            raise SampleError(sample, "the plain template (pre-training captions) needs an image")
        return [Segment(image_text, False), Segment(turns[1][1] + template.sep, True)]

    conversation = template.copy()
    conversation.messages = []
    segments: list[Segment] = []
    rendered = ""
    for speaker, text in turns:
        role = conversation.roles[speaker]
        if speaker == 0:
            conversation.append_message(role, text)
            continue
        conversation.append_message(role, None)
        prompt = conversation.get_prompt()
        conversation.messages.pop()
        conversation.append_message(role, text)
        full = conversation.get_prompt()
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise ValueError(
                f"conversation template {template.version!r} ({template.sep_style.name}) does not write a "
                "conversation as a sequence of growing prefixes; its replies cannot be located"
            )
        segments.append(Segment(prompt[len(rendered) :], False))
        segments.append(Segment(full[len(prompt) :], True))
        rendered = full
    trailing = conversation.get_prompt()[len(rendered) :]
    if trailing:  # a last human turn without reply: read, not learnt
        segments.append(Segment(trailing, False))
    return segments


def encode_text(tokenizer, text: str, *, first: bool, left_special: str | None) -> list[int]:
    """Token ids of one piece of text (no ``<image>`` inside).

    ``first``: the start of the sequence, tokenized as the tokenizer does a whole prompt (BOS included).
    ``left_special``: the special token just before this piece; it is tokenized as left context and
    dropped, so that the piece gets the ids it has inside the whole prompt.
    """
    if first:
        return list(tokenizer(text).input_ids)
    if left_special is None:
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    anchor = list(tokenizer(left_special, add_special_tokens=False).input_ids)
    ids = list(tokenizer(left_special + text, add_special_tokens=False).input_ids)
    if ids[: len(anchor)] != anchor:
        raise ValueError(f"the tokenizer does not keep the special token {left_special!r} whole")
    return ids[len(anchor) :]


def encode_segment(tokenizer, text: str, *, first: bool, left_special: str | None) -> list[int]:
    """Ids of a segment; each ``<image>`` becomes ``IMAGE_TOKEN_INDEX`` and the text around it is
    tokenized on its own, as ``llava.mm_utils.tokenizer_image_token`` does at inference."""
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    ids = encode_text(tokenizer, chunks[0], first=first, left_special=left_special)
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(encode_text(tokenizer, chunk, first=False, left_special=None))
    return ids


def special_token_strings(tokenizer) -> list[str]:
    specials = set(tokenizer.all_special_tokens)
    specials.update(str(t) for t in tokenizer.added_tokens_decoder.values() if getattr(t, "special", False))
    return sorted((s for s in specials if s), key=len, reverse=True)


def tokenize_segments(segments: list[Segment], tokenizer, sample: str) -> tuple[list[int], list[int]]:
    specials = special_token_strings(tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    previous = ""
    for position, segment in enumerate(segments):
        if segment.supervised and DEFAULT_IMAGE_TOKEN in segment.text:
            raise SampleError(sample, f"a reply contains {DEFAULT_IMAGE_TOKEN}")
        left_special = next((s for s in specials if previous.endswith(s)), None)
        ids = encode_segment(tokenizer, segment.text, first=position == 0, left_special=left_special)
        input_ids.extend(ids)
        labels.extend(ids if segment.supervised else [IGNORE_INDEX] * len(ids))
        previous = segment.text
    return input_ids, labels


def check_replies(turns: list[tuple[int, str]], tokenizer, sample: str) -> None:
    """A special token written inside a reply (``</s>`` in the text, say) would be tokenized as a control
    token: the model would learn to stop mid-answer. Such samples are unlearnable, not silently used."""
    specials = [s for s in special_token_strings(tokenizer) if s != DEFAULT_IMAGE_TOKEN]
    for position, (speaker, text) in enumerate(turns):
        if speaker == 1:
            found = [s for s in specials if s in text]
            if found:
                raise UnlearnableSample(
                    sample, f"gpt turn {position} contains the special token(s) {found} as text", "special_token"
                )


def tokenize_conversation(
    turns: list[tuple[int, str]],
    template: Conversation,
    tokenizer,
    sample: str,
    *,
    check_tokenization: bool = True,
) -> TokenizedConversation:
    """Input ids and labels (``IGNORE_INDEX`` outside the replies) of a checked conversation."""
    check_replies(turns, tokenizer, sample)
    segments = conversation_segments(turns, template, sample)
    input_ids, labels = tokenize_segments(segments, tokenizer, sample)
    prompt = "".join(segment.text for segment in segments)
    if check_tokenization:
        whole = tokenizer_image_token(prompt, tokenizer)
        if whole != input_ids:
            first_difference = next(
                (i for i, (a, b) in enumerate(zip(whole, input_ids)) if a != b), min(len(whole), len(input_ids))
            )
            raise UnlearnableSample(
                sample,
                f"tokenization mismatch: the prompt tokenized whole ({len(whole)} ids) and by segments "
                f"({len(input_ids)} ids) differ from position {first_difference}",
                "tokenization_mismatch",
            )
    return TokenizedConversation(input_ids=input_ids, labels=labels, prompt=prompt)
