"""Conversation templates: how a chat is written into one prompt string for each LLaVA language model.

The prompt strings are part of a checkpoint's contract (it was trained on them), so every template here
writes exactly what the original LLaVA writes; the fixture records (``llava_outputs_seed0.pt``) hold
``vicuna_v1`` prompts to check against.
"""
from __future__ import annotations

import base64
import dataclasses
from enum import Enum, auto
from io import BytesIO

from llava.constants import DEFAULT_IMAGE_TOKEN


class SeparatorStyle(Enum):
    """How turns are joined (see ``Conversation.get_prompt``)."""

    SINGLE = auto()  # "ROLE: message<sep>" for every turn
    TWO = auto()  # as SINGLE, alternating <sep> (after user turns) and <sep2> (after assistant turns)
    MPT = auto()  # "<role>message<sep>" (ChatML-like: roles carry their own markup)
    PLAIN = auto()  # messages only, no roles (pre-training captions)
    LLAMA_2 = auto()  # "[INST] <<SYS>>...<</SYS>> user [/INST] assistant </s><s>[INST] ..."


@dataclasses.dataclass
class Conversation:
    """A chat: a system prompt, two roles and the turns so far.

    ``messages`` is a list of ``[role, message]``; a message is a string, ``None`` (the turn the model is
    to write next) or, for the first user turn in the demo UIs, a tuple ``(text, image, image_process_mode)``.
    """

    system: str
    roles: tuple[str, str]
    messages: list
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"
    skip_next: bool = False

    def _normalised_messages(self) -> list:
        """The messages with a tuple first turn turned into text (where the image token goes)."""
        messages = [list(m) for m in self.messages]
        if messages and isinstance(messages[0][1], tuple):
            role, (text, *_rest) = messages[0]
            text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
            if "mmtag" in self.version:
                messages[0] = [role, text]
                messages.insert(0, [self.roles[0], "<Image><image></Image>"])
                messages.insert(1, [self.roles[1], "Received."])
            else:
                messages[0] = [role, DEFAULT_IMAGE_TOKEN + "\n" + text]
        return messages

    @staticmethod
    def _text(message) -> str:
        return message[0] if isinstance(message, tuple) else message

    def get_prompt(self) -> str:
        messages = self._normalised_messages()
        style = self.sep_style
        if style == SeparatorStyle.SINGLE:
            out = self.system + self.sep
            for role, message in messages:
                out += f"{role}: {self._text(message)}{self.sep}" if message else f"{role}:"
            return out
        if style == SeparatorStyle.TWO:
            seps = (self.sep, self.sep2)
            out = self.system + seps[0]
            for i, (role, message) in enumerate(messages):
                out += f"{role}: {self._text(message)}{seps[i % 2]}" if message else f"{role}:"
            return out
        if style == SeparatorStyle.MPT:
            out = self.system + self.sep
            for role, message in messages:
                out += f"{role}{self._text(message)}{self.sep}" if message else role
            return out
        if style == SeparatorStyle.LLAMA_2:
            return self._llama_2_prompt(messages)
        if style == SeparatorStyle.PLAIN:
            # [VisionZip-LLaVA] the original joins odd turns with sep2, which is None for `plain` and fails;
            # fall back to sep so that a caption turn can be written.
            seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
            out = self.system
            for i, (_role, message) in enumerate(messages):
                if message:
                    out += self._text(message) + seps[i % 2]
            return out
        raise ValueError(f"invalid separator style: {self.sep_style}")

    def _llama_2_prompt(self, messages) -> str:
        def with_system(text: str) -> str:
            return f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}" if self.system else text

        out = ""
        for i, (role, message) in enumerate(messages):
            if i == 0:
                if not message:
                    raise ValueError("the first message of a llama_2 conversation must not be empty")
                if role != self.roles[0]:
                    raise ValueError(f"the first message must come from {self.roles[0]!r}, not {role!r}")
            if not message:
                continue
            text = self._text(message)
            if i == 0:
                text = with_system(text)
            if i % 2 == 0:
                out += f"{self.sep}[INST] {text} [/INST]"
            else:
                out += f" {text} {self.sep2}"
        # the prompt does not start with the separator (the tokenizer adds BOS itself)
        return out[len(self.sep) :] if self.sep and out.startswith(self.sep) else out

    def append_message(self, role: str, message) -> None:
        self.messages.append([role, message])

    def get_images(self, return_pil: bool = False) -> list:
        """Images attached to user turns (tuple messages), as PIL images or base64 PNG strings."""
        images = []
        for i, (_role, message) in enumerate(self.messages[self.offset :]):
            if i % 2 == 0 and isinstance(message, tuple):
                image = message[1]
                if return_pil:
                    images.append(image)
                else:
                    buffer = BytesIO()
                    image.convert("RGB").save(buffer, format="PNG")
                    images.append(base64.b64encode(buffer.getvalue()).decode())
        return images

    def copy(self) -> Conversation:
        return dataclasses.replace(self, messages=[list(m) for m in self.messages])

    def dict(self) -> dict:
        messages = [[role, self._text(message) if message else message] for role, message in self.messages]
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": messages,
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }


conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why "
    "instead of answering something not correct. If you don't know the answer to a question, please "
    "don't share false information.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. You are able to understand the visual content "
    "that the user provides, and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mistral_instruct = Conversation(
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_chatml_direct = Conversation(
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v1 = Conversation(
    system="A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, and assist the user "
    "with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>.",
    roles=("USER", "ASSISTANT"),
    messages=[],
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

default_conversation = conv_vicuna_v1

conv_templates: dict[str, Conversation] = {
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def get_conv_template(name: str) -> Conversation:
    """A fresh copy of the template ``name`` (a ValueError lists the known names)."""
    if name not in conv_templates:
        raise ValueError(f"unknown conversation template {name!r}; known: {sorted(conv_templates)}")
    return conv_templates[name].copy()
