"""Checks every entry point runs before it loads a model, so that bad input fails in seconds, by name.

Each check raises a ``ValueError`` (``OSError`` for the file system) naming the value and the limit:

- ``check_device``: the device exists (``--device cuda`` on a machine without CUDA is refused instead of
  silently running half precision on the CPU);
- ``check_output_dir``: the output folder can be created and written to, and has room for what the run
  will write (a read-only folder otherwise shows up only after every training step);
- ``check_generation_options``: ``num_beams >= 1``, finite ``temperature >= 0``, ``top_p`` in (0, 1],
  ``max_new_tokens >= 1``;
- ``check_images_decode``: every image opens and decodes (``llava.mm_utils.load_image``);
- ``check_pixel_values``: pixels given to the public API are floating point, finite and normalised;
- ``check_prompts_fit`` / ``check_prompt_fits``: prompts (visual tokens included) fit the model's positions;
  the one prompt-length policy of every entry point (``PromptTooLong`` names the length and the limit);
- ``check_image_geometry``: an image's size is one the preprocessing can handle (aspect ratio, padded
  canvas, anyres grid) before any pixel buffer is allocated.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence

# Normalised pixels (CLIP / SigLIP mean and std) lie within about [-2.2, 2.7]; values far beyond mean the
# caller passed raw 0..255 pixels without the image processor.
from visionzip.encoders import MAX_NORMALISED_PIXEL  # noqa: E402  (one bound for both checks)


def check_device(device: str) -> str:
    """``device`` resolved ("auto" -> cuda when available, else cpu); a ValueError for one that is absent."""
    import torch

    device = (device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        index = device.partition(":")[2]
        if index:
            if not index.isdigit():
                raise ValueError(f"--device {device}: expected cuda or cuda:N")
            if int(index) >= torch.cuda.device_count():
                raise ValueError(
                    f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (0..."
                    f"{torch.cuda.device_count() - 1})"
                )
        return device
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError("--device mps: MPS is not available on this machine; use --device cpu")
        return device
    if device != "cpu":
        raise ValueError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def check_output_dir(path: str, needed_bytes: int = 0, what: str = "output directory") -> str:
    """Create ``path`` if needed, prove it writable with a probe file, and check ``needed_bytes`` free."""
    if not path:
        raise ValueError(f"the {what} is empty")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise OSError(err.errno, f"{what} {path} is not writable ({err.strerror or err})") from err
    free = shutil.disk_usage(path).free
    if needed_bytes and free < needed_bytes:
        raise OSError(
            28,
            f"{what} {path} has {free / 2**20:.1f} MiB free, less than the {needed_bytes / 2**20:.1f} MiB "
            "this run will write; free some space or choose another folder",
        )
    return path


def folder_weight_bytes(folder: str) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``) directly in ``folder`` (0 if none)."""
    if not folder or not os.path.isdir(folder):
        return 0
    total = 0
    for name in os.listdir(folder):
        if name.endswith((".safetensors", ".bin")):
            total += os.path.getsize(os.path.join(folder, name))
    return total


def check_generation_options(
    temperature: float | None = 0.0,
    top_p: float | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 1,
) -> None:
    """Decoding options: a ValueError naming the option and its limit."""
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None:
        if not isinstance(top_p, (int, float)) or not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"--num_beams must be an integer >= 1, got {num_beams!r}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def check_images_decode(paths: Iterable[str]) -> list:
    """Open and decode every image; returns the RGB images. ``ImageLoadError`` (a ValueError) names a bad one."""
    from llava.mm_utils import load_image

    return [load_image(path) for path in paths]


def check_pixel_values(pixel_values, what: str = "pixel_values") -> None:
    """Pixels given to the model: floating point, finite, and normalised by the image processor.

    pixel_values: a tensor (..., 3, H, W) or a list of such tensors (anyres).
    """
    import torch

    tensors = pixel_values if isinstance(pixel_values, (list, tuple)) else [pixel_values]
    for index, tensor in enumerate(tensors):
        name = what if len(tensors) == 1 else f"{what}[{index}]"
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.dtype.is_floating_point:
            raise ValueError(
                f"{name} has dtype {tensor.dtype}: pass the image processor's normalised float pixels, not raw "
                "0..255 values"
            )
        if tensor.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(tensor.shape)})")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
        peak = float(tensor.detach().abs().max())
        if peak > MAX_NORMALISED_PIXEL:
            raise ValueError(
                f"{name} reaches |{peak:g}|, beyond the {MAX_NORMALISED_PIXEL:g} of normalised pixels: pass the "
                "image processor's output (mean/std normalised), not raw 0..255 values"
            )


class PromptTooLong(ValueError):
    """Prompts of a batch that do not fit the model's positions (``llava.preflight.check_prompts_fit``).

    rows: the indices (in the batch) of the prompts that do not fit; positions: every prompt's positions
    (visual tokens included); limit: the model's positions. A caller that answers many questions (the
    eval engine, the lmms-eval plugin) may catch it to refuse those rows by name and answer the others.
    """

    def __init__(self, message: str, rows: list[int], positions: list[int], limit: int):
        super().__init__(message)
        self.rows, self.positions, self.limit = rows, positions, limit


def check_prompts_fit(
    positions: Sequence[int], max_new_tokens: int | None, max_positions: int | None, what: str = "prompt"
) -> int | None:
    """The one prompt-length policy of every entry point (run_llava, the chat, ``model.generate``, the eval
    engine, the lmms-eval plugin): nothing is cut silently.

    positions: each prompt's sequence positions with its visual tokens counted one by one. A prompt that
    leaves no room for a reply (``positions >= max_positions``) raises ``PromptTooLong`` naming its length
    and the limit; otherwise returns ``min(max_new_tokens, max_positions - max(positions))`` (None stays
    None), so that the cache never passes the model's positions. ``max_positions`` None: no limit known.
    """
    positions = [int(p) for p in positions]
    if max_positions is None or not positions:
        return max_new_tokens
    rows = [row for row, length in enumerate(positions) if length >= max_positions]
    if rows:
        lengths = ", ".join(str(positions[row]) for row in rows[:5]) + (", ..." if len(rows) > 5 else "")
        which = "" if len(positions) == 1 else f" (batch rows {rows[:5]}{' ...' if len(rows) > 5 else ''})"
        raise PromptTooLong(
            f"the {what}{which} takes {lengths} positions (visual tokens included), the model has "
            f"{max_positions}: nothing may be cut silently, so shorten the text, compress the visual tokens "
            "(--compression) or start a new conversation",
            rows, positions, max_positions,
        )
    room = max_positions - max(positions)
    return room if max_new_tokens is None else min(max_new_tokens, room)


def check_prompt_fits(prompt_positions: int, max_new_tokens: int, max_positions: int | None, what: str = "prompt") -> int:
    """``check_prompts_fit`` for one prompt of ``prompt_positions``: a ``PromptTooLong`` (ValueError) with the
    lengths when it leaves no room for a reply, else the new tokens that fit."""
    return check_prompts_fit([prompt_positions], max_new_tokens, max_positions, what)


def model_max_positions(config) -> int | None:
    """The positions a LLaVA model may hold: ``tokenizer_model_max_length`` (what the model was trained on),
    capped by the language model's ``max_position_embeddings``; None when neither is set."""
    limits = [
        int(value)
        for value in (getattr(config, "tokenizer_model_max_length", None), getattr(config, "max_position_embeddings", None))
        if isinstance(value, (int, float)) and value and value > 0
    ]
    return min(limits) if limits else None


def split_image_files(value: str, sep: str = ",") -> list[str]:
    """The image paths/URLs of ``--image-file``: the whole value when it is one existing file or a URL (a
    path may contain the separator, e.g. a comma), else the value split at ``sep``."""
    if not value:
        raise ValueError("--image-file is empty")
    if os.path.isfile(value) or value.startswith(("http://", "https://")) and sep not in value:
        return [value]
    parts = [part for part in value.split(sep)] if sep else [value]
    if any(not part for part in parts):
        raise ValueError(f"--image-file {value!r} has an empty path between separators {sep!r}")
    return parts


def prompt_positions(model, input_ids, images=None, image_sizes=None) -> list[int]:
    """Sequence positions each prompt of a batch takes once its images are spliced in: the text ids (pads
    excluded by the caller) plus each image's visual tokens (``model.get_image_features``). input_ids:
    list of (L_i,) id tensors with ``IMAGE_TOKEN_INDEX`` where an image goes."""
    import torch

    counts: list[int] = []
    if images is not None:
        with torch.inference_mode():
            counts = [int(f.shape[0]) for f in model.get_image_features(images, image_sizes).per_image]
    return spliced_positions(input_ids, counts)


def spliced_positions(input_ids, visual_tokens: Sequence[int], attention_mask=None) -> list[int]:
    """Positions each prompt takes once its images' visual tokens replace its ``<image>`` placeholders.

    input_ids: (B, L) tensor or a list of (L_i,) tensors with ``IMAGE_TOKEN_INDEX`` where an image goes
    (give host copies: each row is read); visual_tokens: each image's token count, in batch order;
    attention_mask (B, L): real tokens (None: all). A ValueError when the images do not match the
    placeholders one to one.
    """
    from llava.constants import IMAGE_TOKEN_INDEX

    rows = list(input_ids)
    masks = [None] * len(rows) if attention_mask is None else list(attention_mask)
    positions, image_index = [], 0
    for ids, mask in zip(rows, masks):
        if mask is not None:
            ids = ids[mask.bool()]
        placeholders = int((ids == IMAGE_TOKEN_INDEX).sum())
        visual = sum(int(n) for n in visual_tokens[image_index : image_index + placeholders])
        image_index += placeholders
        positions.append(int(ids.numel()) - placeholders + visual)
    if image_index != len(visual_tokens):
        raise ValueError(f"the batch has {image_index} <image> placeholders but {len(visual_tokens)} images")
    return positions
