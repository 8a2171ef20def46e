"""One answer-generation engine for every benchmark format (LLaVA's ``model_vqa_*`` scripts in one).

    python -m llava.eval.generate --format vqa --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
        --image-folder playground/data/eval/pope/val2014 \\
        --answers-file playground/data/eval/pope/answers/llava-v1.5-7b/visionzip/64/1_0.jsonl \\
        --compression visionzip:54,10 --batch-size 8 --num-chunks 1 --chunk-idx 0

- formats: ``vqa`` / ``science`` / ``mmbench`` / ``mmmu`` (``llava.eval.formats``); the LLaVA names
  ``python -m llava.eval.model_vqa_loader`` (vqa), ``model_vqa`` (vqa, long answers), ``model_vqa_science``,
  ``model_vqa_mmbench`` and ``model_vqa_mmmu`` are this command with the format preset.
- compression: ``--compression none | METHOD:TOKENS | METHOD:key=value,...``, or its alias in the paper's
  terms ``--method M --budget B [--budget-family v1.5|v1.6]`` (totals per image: ``llava.eval.budgets``),
  both parsed by ``llava.compression_args.compression_from_flags``.
- model: a LLaVA checkpoint (``LlavaProcessor``, ``--conv-mode`` a LLaVA template), or a natively implemented
  family's (``llava.model.builder.NATIVE_FAMILIES``: CogVLM, Qwen-VL), whose model builds its own inputs
  (``llava.eval.model_processor``: its own prompt format and pixels; ``--conv-mode`` its own format, if any).
- batches of ``--batch-size`` questions, left-padded; ``--num-chunks/--chunk-idx`` shards the questions.
- resumable: questions already in the answers file are skipped (a run cut short is simply run again);
  ``--overwrite`` starts afresh. Settings that change answers (model, compression, prompt, decoding)
  must match the ones recorded for the file, else the run stops instead of mixing answers.
- ``<answers>.settings.json`` beside the answers records the settings, the counts and the timings; answers
  whose settings record is gone are never resumed (``--overwrite``).
- a prompt beyond the model's positions is never cut silently: ``--prompt-too-long error`` (default) stops
  naming it, ``refuse`` answers it empty, ``truncate`` cuts it as the original LLaVA did; both are marked
  in the answer, counted in the settings record and reported (``llava.preflight.check_prompts_fit``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm

from .data_io import read_json, settings_path_for, write_json
from .formats import EvalItem, QuestionFormat, ReaderOptions, get_format, read_items

# Settings that change what the model answers: a resumed run must use the same ones.
ANSWER_AFFECTING = (
    "model_path", "model_base", "conv_mode", "compression", "format", "question_file", "single_pred_prompt",
    "all_rounds", "lang", "temperature", "top_p", "num_beams", "max_new_tokens", "dtype", "num_chunks",
    "chunk_idx", "prompt_too_long",
)

# --prompt-too-long: what happens to a question whose prompt (visual tokens included) does not fit the
# model's positions. Never a silent cut (the original LLaVA cut the question and "ASSISTANT:" away).
PROMPT_TOO_LONG = ("error", "refuse", "truncate")
# what an answer may carry besides its text (``answer_batch`` returns (text, new tokens, {note: reason})):
# each is written into the answer line, counted in the settings record and reported when the shard ends
ANSWER_NOTES = ("refused", "truncated")


def read_existing_answers(answers_file: Path) -> list[dict]:
    """Answers already written. Bytes after the last newline that are not a whole JSON record are the
    write a crash interrupted: they are cut off so that appending continues cleanly. A bad line
    elsewhere is an error."""
    if not answers_file.is_file():
        return []
    raw = answers_file.read_bytes()
    *complete, tail = raw.split(b"\n")
    records = []
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{answers_file}:{n} is not a JSON line ({err}); fix or delete the file") from err
    if tail.strip():
        try:
            records.append(json.loads(tail))
        except json.JSONDecodeError:
            with answers_file.open("r+b") as f:
                f.truncate(len(raw) - len(tail))
        else:
            with answers_file.open("ab") as f:
                f.write(b"\n")
    return records


def check_resumable(answers_file: Path, settings: dict) -> None:
    """Refuse to add answers made with other answer-affecting settings to an existing answers file, and
    to add any to answers whose settings record is gone (what made them is unknown)."""
    settings_file = settings_path_for(answers_file)
    if not settings_file.is_file():
        raise ValueError(
            f"{answers_file} holds answers but its settings record {settings_file} is missing, so the settings "
            "they were made with are unknown and new answers could be mixed with them; use --overwrite to "
            "start it again, or another --answers-file"
        )
    previous = read_json(settings_file)
    settings = json.loads(json.dumps(settings))  # as stored: tuples read back as lists
    changed = {k: (previous.get(k), settings.get(k)) for k in ANSWER_AFFECTING if previous.get(k) != settings.get(k)}
    if changed:
        details = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{answers_file} was generated with other settings ({details}); "
            "use another --answers-file, or --overwrite to start it again"
        )


def batches(items: Sequence[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    """Consecutive items in batches of at most ``batch_size``; a batch never mixes questions with and
    without an image (ScienceQA), as the model takes images for the whole batch or none."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out: list[list[EvalItem]] = []
    for item in items:
        if out and len(out[-1]) < batch_size and out[-1][0].has_image == item.has_image:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def run_generation(*args, **kwargs) -> dict:
    """``generate_answers`` holding the answers file's lock (``data_io.answers_lock``): the same shard
    launched twice at once is refused instead of writing its answers twice."""
    from .data_io import answers_lock

    answers_file = kwargs["answers_file"] if "answers_file" in kwargs else args[2]
    Path(answers_file).parent.mkdir(parents=True, exist_ok=True)
    with answers_lock(answers_file):
        return generate_answers(*args, **kwargs)


def generate_answers(
    items: Sequence[EvalItem],
    fmt: QuestionFormat,
    answers_file,
    answer_batch: Callable[[list[EvalItem]], list[tuple[str, int]]],
    settings: dict,
    batch_size: int = 1,
    overwrite: bool = False,
    model_id: str = "",
    progress: bool = True,
) -> dict:
    """Answer ``items`` not yet in ``answers_file`` with ``answer_batch`` (-> [(text, new tokens) or
    (text, new tokens, notes)]), appending one json line per answer, and keep ``<answers>.settings.json``
    up to date. Notes (``ANSWER_NOTES``: ``{"refused": reason}`` for a question answered empty, which a
    scorer counts wrong; ``{"truncated": reason}`` for one answered from a cut prompt) go into the answer
    line and are counted in the record (``num_refused`` and ``refused``: question ids and reasons), which
    says so when the shard completes."""
    answers_file = Path(answers_file)
    settings_file = settings_path_for(answers_file)
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        answers_file.unlink(missing_ok=True)
        settings_file.unlink(missing_ok=True)
    existing = read_existing_answers(answers_file)
    if existing:
        check_resumable(answers_file, settings)
    keys = {item.key for item in items}
    done = set()
    for record in existing:
        key = fmt.answer_key(record)
        if key not in keys:
            raise ValueError(
                f"{answers_file} answers question {key} which is not in this shard of the question file: "
                "another question file or --num-chunks/--chunk-idx wrote it"
            )
        done.add(key)
    todo = [item for item in items if item.key not in done]

    previous = read_json(settings_file) if settings_file.is_file() and existing else {}
    record = {
        **settings,
        "answers_file": str(answers_file),
        "status": "running",
        "num_questions": len(items),
        "num_answered": len(done),
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "generation_seconds": float(previous.get("generation_seconds", 0.0)),
        "generated_tokens": int(previous.get("generated_tokens", 0)),
        "resumed_from": len(done),
    }
    for note in ANSWER_NOTES:  # recorded only when some answer has it (merge_answers compares the rest)
        if previous.get(f"num_{note}"):
            record.update({f"num_{note}": int(previous[f"num_{note}"]), note: list(previous.get(note, []))})
    write_json(settings_file, record)

    bar = tqdm(total=len(items), initial=len(done), desc=answers_file.name, disable=not progress,
               dynamic_ncols=True)
    with answers_file.open("a", encoding="utf-8") as out:
        for batch in batches(todo, batch_size):
            start = time.perf_counter()
            outputs = answer_batch(batch)
            record["generation_seconds"] += time.perf_counter() - start
            if len(outputs) != len(batch):
                raise RuntimeError(f"the model returned {len(outputs)} answers for a batch of {len(batch)}")
            for item, output in zip(batch, outputs):
                text, new_tokens, *rest = output
                notes = rest[0] if rest else {}
                answer = {
                    "question_id": item.question_id,
                    "prompt": item.prompt,
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                    **item.extra,
                }
                for note, reason in notes.items():
                    if note not in ANSWER_NOTES:
                        raise RuntimeError(f"unknown answer note {note!r}; known: {ANSWER_NOTES}")
                    answer[note] = reason
                    record[f"num_{note}"] = record.get(f"num_{note}", 0) + 1
                    record.setdefault(note, []).append({"question_id": item.question_id, "reason": reason})
                out.write(json.dumps(answer, ensure_ascii=False) + "\n")
                record["generated_tokens"] += int(new_tokens)
            out.flush()
            record["num_answered"] += len(batch)
            write_json(settings_file, record)  # counts and time survive a crash (resuming adds to them)
            bar.update(len(batch))
    bar.close()
    record["status"] = "complete"
    for note, what in (("refused", "refused, written with an empty answer"), ("truncated", "answered from a cut prompt")):
        if record.get(f"num_{note}"):
            print(f"{answers_file}: {record[f'num_{note}']} of {len(items)} questions {what} (see '{note}' in "
                  f"{settings_file.name}); first: {record[note][0]}")
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(settings_file, record)
    return record


class LlavaAnswerer:
    """Loads a checkpoint (with its visual-token compression) and answers batches of items: a LLaVA checkpoint
    through ``LlavaProcessor``, a natively implemented family (``llava.model.builder.NATIVE_FAMILIES``) through
    the processor its model builds (``llava.eval.model_processor``)."""

    def __init__(self, model_path: str, model_base: str | None, conv_mode: str | None, compression, device: str,
                 dtype: str, temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1,
                 max_new_tokens: int = 128, seed: int = 0, compile: bool = False,
                 prompt_too_long: str = "error"):
        import torch

        from llava.mm_utils import get_model_name_from_path
        from llava.model.builder import load_pretrained_model

        from .model_processor import check_llava_conv_mode, processor_for, refuse_llava_only_option

        if conv_mode is not None and checkpoint_config(model_path, model_base):
            check_llava_conv_mode(conv_mode)  # a LLaVA checkpoint: refused before loading
        if prompt_too_long not in PROMPT_TOO_LONG:
            raise ValueError(f"--prompt-too-long must be one of {PROMPT_TOO_LONG}, got {prompt_too_long!r}")
        self.prompt_too_long = prompt_too_long
        self.torch = torch
        self.device = resolve_device(device)
        self.dtype_name = resolve_dtype(dtype, self.device)
        self.dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype_name]
        self.model_name = get_model_name_from_path(model_path)
        self.tokenizer, self.model, self.image_processor, _ = load_pretrained_model(
            model_path, model_base, self.model_name, device=self.device, compression=compression,
            torch_dtype=self.dtype,
        )
        self.model.eval()
        # the model's own processor where it builds its own inputs (a native family: llava.eval.model_processor),
        # else LlavaProcessor; conv_mode None: the checkpoint's template (mistral_instruct for llava_mistral,
        # else vicuna_v1; a native family's own format)
        self.processor, self.conv_mode = processor_for(self.model, self.tokenizer, self.image_processor, conv_mode)
        if prompt_too_long == "truncate":
            refuse_llava_only_option(self.model, "--prompt-too-long truncate",
                                     "cuts a prompt as the original LLaVA did (to reproduce its answers)")
        if compile:
            refuse_llava_only_option(self.model, "--compile", "runs LLaVA's compiled path (llava.model.compiled)")
        self.temperature, self.top_p, self.num_beams = temperature, top_p, num_beams
        self.max_new_tokens = max_new_tokens
        torch.manual_seed(seed)
        self.pad_id = self.processor.pad_token_id
        from llava.model.compiled import generate_function

        # --compile: the static-cache, torch.compile path (llava.model.compiled); same arguments and output
        self.generate = generate_function(self.model, compile)

    def prompt_for(self, item: EvalItem) -> str:
        return self.processor.build_prompt(item.question, 1 if item.has_image else 0)

    def __call__(self, batch: list[EvalItem]) -> list:
        """[(answer, new tokens)] of the batch; a question whose prompt does not fit the model's positions
        stops the run naming it (``--prompt-too-long error``), is answered empty with a ``refused`` note
        (``refuse``), or is answered from the prompt cut as the original LLaVA cut it, with a ``truncated``
        note (``truncate``: to reproduce the original's answers)."""
        from llava.preflight import PromptTooLong

        try:
            return self.answer(batch)
        except PromptTooLong as err:
            if len(batch) > 1 and len(err.positions) != len(batch):
                # the model measured the padded batch as a whole, not each prompt: which question does not
                # fit is found by asking them one at a time (each answered, refused or stopped on its own)
                return [answer for item in batch for answer in self([item])]
            ids = [batch[row].question_id for row in err.rows]
            if self.prompt_too_long == "error":
                raise ValueError(
                    f"question(s) {ids}: {err}; or pass --prompt-too-long refuse (answered empty) or truncate "
                    "(cut as the original LLaVA did), both counted"
                ) from err
            reasons = {
                row: f"prompt too long: {err.positions[row]} positions (visual tokens included) > the model's "
                     f"{err.limit}"
                for row in err.rows
            }
        if self.prompt_too_long == "truncate":
            answers = self.answer(batch, prompt_too_long="truncate")
            return [(*answers[row], {"truncated": reasons[row]}) if row in reasons else answers[row]
                    for row in range(len(batch))]
        rest = [item for row, item in enumerate(batch) if row not in reasons]
        answers = iter(self(rest) if rest else [])
        return [("", 0, {"refused": reasons[row]}) if row in reasons else next(answers) for row in range(len(batch))]

    def answer(self, batch: list[EvalItem], prompt_too_long: str = "error") -> list[tuple[str, int]]:
        torch = self.torch
        questions = [item.question for item in batch]
        images = [item.load_image() for item in batch] if batch[0].has_image else None
        if images is not None:  # named by question, before any padding canvas or resize is made
            from llava.mm_utils import DEFAULT_RESIZE_SIDE, check_image_geometry, processor_resize_side

            aspect = getattr(self.model.config, "image_aspect_ratio", None)
            # a native family's image processor may have no CLIP-style size (CogVLM resizes to a fixed square):
            # the bound of a square resize to CLIP's side, as llava.mm_utils.process_images checks it
            side = (processor_resize_side(self.image_processor) if getattr(self.image_processor, "size", None)
                    else DEFAULT_RESIZE_SIDE)
            for item, image in zip(batch, images):
                check_image_geometry(image.size, aspect if aspect in ("pad", "anyres") else "square", side,
                                     f"question {item.question_id}")
        inputs = self.processor(questions, images)
        input_ids, width = inputs.input_ids.cpu(), inputs.input_ids.shape[1]
        kwargs = inputs.generate_kwargs()
        sampling = self.temperature > 0
        with torch.inference_mode():
            output_ids = self.generate(
                do_sample=sampling,
                temperature=self.temperature if sampling else None,
                top_p=self.top_p if sampling else None,
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_id,
                use_cache=True,
                **kwargs,
                **({} if prompt_too_long == "error" else {"prompt_too_long": prompt_too_long}),
            )
        if output_ids.shape[1] > width and torch.equal(output_ids[:, :width].cpu(), input_ids):
            output_ids = output_ids[:, width:]  # generate() returned the prompt too
        texts = self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)
        eos = self.tokenizer.eos_token_id
        out = []
        for row, text in enumerate(texts):
            tokens = output_ids[row]
            new_tokens = int(((tokens != self.pad_id) & (tokens != eos)).sum()) if eos is not None else len(tokens)
            out.append((text.strip(), new_tokens))
        return out


def _nothing_to_answer(batch: list[EvalItem]) -> list[tuple[str, int]]:
    raise RuntimeError(f"{len(batch)} question(s) left to answer where none was expected")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        # half precision as LLaVA's evaluation on GPUs; float32 on CPU, where half is slow or unsupported
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def build_parser(default_format: str | None = None, default_max_new_tokens: int = 128,
                 prog: str = "python -m llava.eval.generate") -> argparse.ArgumentParser:
    from visionzip.budgets import BUDGET_FAMILIES

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", default=default_format, required=default_format is None,
                        choices=["vqa", "science", "mmbench", "mmmu"], help="question file format")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--conv-mode", default=None,
                        help="conversation template (default: the checkpoint's, mistral_instruct for llava_mistral, else vicuna_v1)")
    parser.add_argument("--question-file", required=True)
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--num-chunks", type=int, default=1)
    parser.add_argument("--chunk-idx", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    parser.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                        default=default_max_new_tokens)
    parser.add_argument("--single-pred-prompt", action="store_true",
                        help="ScienceQA / MMBench: ask for the option letter only")
    parser.add_argument("--all-rounds", action="store_true", help="MMBench: one round per option, rotated")
    parser.add_argument("--lang", default="en", choices=["en", "cn"], help="MMBench hint language")
    parser.add_argument("--compression", default=None,
                        help="none | METHOD:TOKENS | METHOD:key=value,... (any registered method; TOKENS per "
                             "image, per view on LLaVA-NeXT)")
    # alias of --compression in the paper's terms (what the eval scripts pass): the same parser
    # (llava.compression_args.compression_from_flags) turns --method/--budget into the per-view spec
    parser.add_argument("--method", default=None,
                        help="alias: a registered method (or none) with --budget, instead of --compression")
    parser.add_argument("--budget", default=None,
                        help="with --method: total visual tokens per image (64; NeXT 160 = 5 views) or per-view "
                             "settings")
    parser.add_argument("--budget-family", default=None, choices=sorted(BUDGET_FAMILIES),
                        help="which budget family --budget refers to (default: the checkpoint's: anyres = v1.6)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="discard existing answers instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--prompt-too-long", default="error", choices=PROMPT_TOO_LONG,
                        help="a question whose prompt (visual tokens included) does not fit the model's positions: "
                             "error = stop naming it (default); refuse = write it with an empty answer; truncate = "
                             "cut it as the original LLaVA did (to reproduce its answers); refused and truncated "
                             "answers are marked, counted in the settings record and reported (never silent)")
    from llava.model.compiled import add_compile_argument

    add_compile_argument(parser)
    return parser


def checkpoint_config(model_path: str, model_base: str | None = None) -> dict:
    """The checkpoint's ``config.json`` as a dict, read without loading the model ({} when unreadable)."""
    for path in (model_path, model_base):
        if not path:
            continue
        if os.path.isdir(path):
            file = os.path.join(path, "config.json")
        else:
            try:
                from huggingface_hub import hf_hub_download

                file = hf_hub_download(path, "config.json")
            except Exception:  # noqa: BLE001 (offline, private, or not a hub id: decided after loading)
                continue
        if os.path.isfile(file):
            try:
                config = read_json(file)
            except ValueError:
                continue
            if isinstance(config, dict) and "image_aspect_ratio" in config:
                return config
    return {}


def resolve_compression(args, image_aspect_ratio: str | None = None) -> tuple[object, dict]:
    """The CompressionConfig and the budget description to record, from --compression or its alias
    --method/--budget (one parser: ``llava.compression_args.compression_from_flags``).

    The budget family comes from the checkpoint (``image_aspect_ratio``: anyres = v1.6, 5 views per image);
    an explicit ``--budget-family`` that contradicts it is refused. What is recorded is what runs: the
    method's per-view settings, the views an image can have, and the visual tokens per image at most.
    """
    from llava.compression_args import compression_from_flags
    from visionzip.budgets import family_of

    family = family_of(image_aspect_ratio) if image_aspect_ratio is not None else None
    if family and args.budget_family and args.budget_family != family:
        raise ValueError(
            f"--budget-family {args.budget_family} contradicts the checkpoint {args.model_path} "
            f"(image_aspect_ratio {image_aspect_ratio!r} = {family}); leave --budget-family out"
        )
    family = family or args.budget_family or "v1.5"
    if args.method is None and args.budget is not None:
        raise ValueError("--budget needs --method (or give --compression METHOD:TOKENS per view)")
    spec = args.compression if args.compression is not None or args.method is not None else "none"
    run = compression_from_flags(spec, method=args.method, budget=args.budget, family=family)
    config = run.compression
    per_view = config.tokens_per_image if config.enabled else None
    most = None if per_view is None else run.views * per_view
    return config, {
        "method": config.method, "budget_label": run.label, "budget_family": family,
        "image_aspect_ratio": image_aspect_ratio, "views_per_image_max": run.views,
        "compression_per_view": config.spec() if config.enabled else "none",
        "visual_tokens_per_view": per_view, "visual_tokens": most, "max_visual_tokens_per_image": most,
    }


def main(argv=None, default_format: str | None = None, default_max_new_tokens: int = 128,
         prog: str = "python -m llava.eval.generate") -> dict:
    parser = build_parser(default_format, default_max_new_tokens, prog)
    args = parser.parse_args(argv)
    try:
        from llava.preflight import check_generation_options

        check_generation_options(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        config = checkpoint_config(args.model_path, args.model_base)
        image_aspect_ratio = config.get("image_aspect_ratio")
        if args.conv_mode is None and config:  # else: decided from the loaded model (LlavaAnswerer)
            from llava.model.builder import default_conv_mode

            args.conv_mode = default_conv_mode(config)
        compression, budget = resolve_compression(args, image_aspect_ratio)
        fmt = get_format(args.format)
        options = ReaderOptions(args.image_folder, args.single_pred_prompt, args.all_rounds, args.lang)
        items = read_items(fmt, args.question_file, options, args.num_chunks, args.chunk_idx)
        device = resolve_device(args.device)
        answers_file = Path(args.answers_file)
        has_answers = answers_file.is_file() and answers_file.stat().st_size > 0
        if not args.overwrite and has_answers and not settings_path_for(answers_file).is_file():
            check_resumable(answers_file, {})  # answers without their settings record: refused before loading
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    settings = {
        "model_path": args.model_path,
        "model_base": args.model_base,
        "conv_mode": args.conv_mode,
        "compression": compression.to_dict(),
        **budget,
        "format": args.format,
        "question_file": str(args.question_file),
        "image_folder": args.image_folder,
        "single_pred_prompt": args.single_pred_prompt,
        "all_rounds": args.all_rounds,
        "lang": args.lang,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "num_chunks": args.num_chunks,
        "chunk_idx": args.chunk_idx,
        "seed": args.seed,
        "compile": args.compile,
        "prompt_too_long": args.prompt_too_long,
        "device": device,
        "dtype": resolve_dtype(args.dtype, device),
        "host": platform.node(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    answers_file = Path(args.answers_file)
    # Nothing to answer (a finished shard run again): skip loading the model.
    if not args.overwrite and answers_file.is_file() and settings_path_for(answers_file).is_file():
        done = {fmt.answer_key(r) for r in read_existing_answers(answers_file)}
        if all(item.key in done for item in items):
            print(f"{answers_file}: all {len(items)} questions already answered")
            if settings["conv_mode"] is None:
                # a checkpoint whose template is decided on loading (a native family's config.json has no
                # LLaVA fields): the one recorded, which the same checkpoint would pick again
                settings["conv_mode"] = read_json(settings_path_for(answers_file)).get("conv_mode")
            try:  # checks the settings and marks the shard complete (a crash may have left it "running")
                return run_generation(items, fmt, answers_file, _nothing_to_answer, settings, args.batch_size,
                                      progress=False)
            except (ValueError, OSError) as err:
                parser.exit(2, f"error: {err}\n")
    answerer = LlavaAnswerer(
        args.model_path, args.model_base, args.conv_mode, compression, args.device, args.dtype,
        args.temperature, args.top_p, args.num_beams, args.max_new_tokens, args.seed, compile=args.compile,
        prompt_too_long=args.prompt_too_long,
    )
    if args.conv_mode is None:  # config.json could not be read before loading: record the template that ran
        settings["conv_mode"] = answerer.conv_mode
    loaded_aspect = getattr(answerer.model.config, "image_aspect_ratio", None)
    if image_aspect_ratio is None and loaded_aspect is not None:
        # config.json could not be read before loading: record what ran, or stop if the budget was split
        # for another family than the loaded checkpoint's
        try:
            loaded_compression, loaded_budget = resolve_compression(args, loaded_aspect)
            if loaded_compression.to_dict() != compression.to_dict():
                raise ValueError(
                    f"the budget was split for {budget['budget_family']} before the checkpoint's config could be "
                    f"read, but {args.model_path} is {loaded_budget['budget_family']}: pass --budget-family "
                    f"{loaded_budget['budget_family']}"
                )
        except ValueError as err:
            parser.exit(2, f"error: {err}\n")
        settings.update(loaded_budget)
    try:
        record = run_generation(items, fmt, answers_file, answerer, settings, args.batch_size, args.overwrite,
                                model_id=answerer.model_name, progress=not args.no_progress)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{answers_file}: {record['num_answered']}/{record['num_questions']} answered, "
          f"{record['generation_seconds']:.1f} s generating")
    return record


if __name__ == "__main__":
    main()
