"""The lmms-eval side of the plugin that needs no lmms-eval: model-argument parsing, grouping requests into
batches, generation settings, stop strings. (``models`` wires these into lmms-eval's ``lmms`` classes.)

An lmms-eval ``generate_until`` request's ``args`` is ``(context, generation_kwargs, doc_to_visual, doc_id,
task, split)`` (lmms-eval 0.7, ``lmms_eval.api.task.ConfigurableTask.construct_requests``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from llava.preflight import PromptTooLong, check_device, check_generation_options
from visionzip.config import CompressionConfig

# generation_kwargs a task may set that we act on (others are refused: silently ignoring one would change
# what is measured)
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "top_p", "num_beams", "do_sample")


def parse_compression(value) -> CompressionConfig | None:
    """The ``compression`` model argument -> a validated ``CompressionConfig``; None (argument absent) keeps
    the checkpoint's own setting. lmms-eval keeps the quotes of a quoted value (needed for a spec with
    commas, ``compression="visionzip:dominant=54,contextual=10"``): they are stripped here."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"compression must be a spec string such as 'visionzip:64' or 'none', got {value!r}")
    spec = value.strip()
    if len(spec) >= 2 and spec[0] == spec[-1] and spec[0] in "\"'":
        spec = spec[1:-1].strip()
    return CompressionConfig.parse(spec).validate()


def parse_batch_size(value) -> int:
    """lmms-eval passes ``--batch_size`` as given on its command line (a string)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r} (lmms-eval's 'auto' is not supported)")
    return int(text)


def check_model_args(model: str, given: dict, accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"{model}: unknown model_args {unknown}; accepted: {', '.join(accepted)}")


@dataclass
class Generation:
    """One batch's generation settings (from the task's ``generation_kwargs``)."""

    max_new_tokens: int
    until: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``generate`` (greedy unless the task asks for a temperature)."""
        sampling = self.do_sample
        return {
            "do_sample": sampling,
            "temperature": self.temperature if sampling else None,
            "top_p": self.top_p if sampling else None,
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
        }

    def cut(self, text: str) -> str:
        """``text`` up to the first stop string (generation ran on to ``max_new_tokens`` or EOS)."""
        end = len(text)
        for stop in self.until:
            if stop:
                found = text.find(stop)
                if found != -1:
                    end = min(end, found)
        return text[:end]


def generation_settings(gen_kwargs: dict | None, default_max_new_tokens: int) -> Generation:
    """A task's ``generation_kwargs`` -> ``Generation``; unknown keys are refused by name."""
    gen_kwargs = dict(gen_kwargs or {})
    unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(f"generation_kwargs {unknown} are not supported; supported: {', '.join(GENERATION_KEYS)}")
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"generation_kwargs['until'] must be a string or a list of strings, got {until!r}")
    # validated as the CLIs' options are (llava.preflight.check_generation_options): a temperature of -1 or
    # nan, num_beams 0 or a top_p of 2 is refused by name, never decoded greedily instead
    max_new_tokens = _number(gen_kwargs, "max_new_tokens", default_max_new_tokens, int)
    temperature = _number(gen_kwargs, "temperature", 0.0, float)
    num_beams = _number(gen_kwargs, "num_beams", 1, int)
    top_p = _number(gen_kwargs, "top_p", None, float)
    check_generation_options(temperature, top_p, num_beams, max_new_tokens)
    if gen_kwargs.get("do_sample") and temperature <= 0:
        raise ValueError("generation_kwargs do_sample=True needs a temperature > 0")
    return Generation(max_new_tokens, until, temperature, top_p, num_beams)


def _number(gen_kwargs: dict, key: str, default, kind):
    """``gen_kwargs[key]`` as ``kind`` (``default`` when absent or None); a string such as "0.2" (lmms-eval's
    command line) is converted, anything else that is not a number is refused by name."""
    value = gen_kwargs.get(key)
    if value is None:
        return default
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None:
        raise ValueError(f"generation_kwargs['{key}'] must be a number, got {value!r}")
    if kind is int:
        if not math.isfinite(number) or number != int(number):
            raise ValueError(f"generation_kwargs['{key}'] must be an integer, got {value!r}")
        return int(number)
    return number


# model argument prompt_too_long: a request whose prompt (visual tokens included) does not fit the model's
# positions stops the evaluation naming it (error), or is answered with an empty text, counted in the
# results' throughput block (avg_refused_prompts) and logged (refuse). Never cut silently.
PROMPT_TOO_LONG = ("error", "refuse")


def parse_prompt_too_long(value) -> str:
    text = str(value).strip().strip("\"'")
    if text not in PROMPT_TOO_LONG:
        raise ValueError(f"prompt_too_long must be one of {PROMPT_TOO_LONG}, got {value!r}")
    return text


def parse_device(device) -> str:
    """The ``device`` model argument: auto/absent -> cuda when available, else cpu; a device that is not
    there (``device=cuda`` without CUDA) is refused (``llava.preflight.check_device``) instead of running
    on the CPU in float16."""
    return check_device("auto" if device in (None, "") else str(device))


def answer_with_refusals(answer, contexts: list, images: list, policy: str) -> tuple[list[str], dict]:
    """``answer(contexts, images)`` -> (texts, metrics) under the prompt-length policy: a ``PromptTooLong``
    raised for some rows stops the run (``error``) or leaves those rows an empty text (``refuse``); the
    others are answered. metrics gains ``refused_prompts`` (how many of this batch were refused)."""
    try:
        texts, metrics = answer(contexts, images)
        metrics["refused_prompts"] = 0
        return texts, metrics
    except PromptTooLong as err:
        if len(contexts) > 1 and len(err.positions) != len(contexts):
            # the model measured the padded batch as a whole, not each prompt: one request at a time finds
            # the ones that do not fit (each answered, refused or stopped on its own)
            texts, merged = [], {"new_tokens": 0, "refused_prompts": 0}
            for context, image in zip(contexts, images):
                text, metrics = answer_with_refusals(answer, [context], [image], policy)
                texts += text
                for key, value in metrics.items():
                    summed = key in ("new_tokens", "refused_prompts")
                    merged[key] = merged[key] + value if summed else merged.get(key, value)
            return texts, merged
        if policy == "error":
            raise ValueError(f"{err}; or pass the model argument prompt_too_long=refuse to answer it empty, "
                             "counted") from err
        refused = set(err.rows)
    rows = [row for row in range(len(contexts)) if row not in refused]
    metrics = {"new_tokens": 0}
    answered = iter([])
    if rows:
        texts, metrics = answer_with_refusals(
            answer, [contexts[r] for r in rows], [images[r] for r in rows], policy
        )
        answered = iter(texts)
    metrics["refused_prompts"] = metrics.get("refused_prompts", 0) + len(refused)
    return ["" if row in refused else next(answered) for row in range(len(contexts))], metrics


@dataclass
class Prepared:
    """One request, ready for a batch: its position among the requests, prompt text and images."""

    index: int
    context: str
    images: list
    gen_kwargs: dict


def group_batches(prepared: list[Prepared], batch_size: int) -> list[list[Prepared]]:
    """Batches of at most ``batch_size`` requests with the same generation settings and the same number of
    images (a batch's pixels go through the tower together), in request order within each group."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[tuple, list[Prepared]] = {}
    for item in prepared:
        key = (json.dumps(item.gen_kwargs, sort_keys=True, default=str), len(item.images))
        groups.setdefault(key, []).append(item)
    batches = []
    for items in groups.values():
        batches.extend(items[start : start + batch_size] for start in range(0, len(items), batch_size))
    return batches


def flatten_visuals(visuals) -> list:
    """``doc_to_visual``'s answer (None, an image, or a possibly nested list of images) -> a flat list of
    PIL images; videos and audio (paths, dicts) are refused by name."""
    from PIL import Image

    out = []

    def walk(value):
        if value is None:
            return
        if isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
        elif isinstance(value, Image.Image):
            out.append(value.convert("RGB"))
        else:
            raise ValueError(
                f"the visionzip lmms-eval models take images only; doc_to_visual gave a {type(value).__name__}"
            )

    walk(visuals)
    return out


def compression_record(config: CompressionConfig) -> dict:
    """What the results' ``throughput`` block records of the compression (lmms-eval keeps numeric metrics
    only, averaged over batches as ``avg_<name>``; the spec itself is in ``config.model_args``): the
    budget per view (image, or crop on LLaVA-NeXT), absent when uncompressed or image-dependent, and the
    method's numeric settings as ``compression_<setting>`` (e.g. VisionZip's dominant and contextual)."""
    record = {}
    if config.tokens_per_image is not None:
        record["budget_tokens_per_view"] = int(config.tokens_per_image)
    if config.enabled:
        for key, value in config.settings.to_dict().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                record[f"compression_{key}"] = value
    return record
