"""One answer-generation engine for every benchmark format (LLaVA's ``model_vqa_*`` scripts in one).

    python -m llava.eval.generate --format vqa --model-path liuhaotian/llava-v1.5-7b \\
        --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
        --image-folder playground/data/eval/pope/val2014 \\
        --answers-file playground/data/eval/pope/answers/llava-v1.5-7b/visionzip/64/1_0.jsonl \\
        --compression visionzip:54,10 --batch-size 8 --num-chunks 1 --chunk-idx 0

- formats: ``vqa`` / ``science`` / ``mmbench`` / ``mmmu`` (``llava.eval.formats``); the LLaVA names
  ``python -m llava.eval.model_vqa_loader`` (vqa), ``model_vqa`` (vqa, long answers), ``model_vqa_science``,
  ``model_vqa_mmbench`` and ``model_vqa_mmmu`` are this command with the format preset.
- compression: ``--compression none | visionzip:D,C | vispruner:T[,ratio]`` or ``--method M --budget B
  --budget-family v1.5|v1.6`` (the paper's budgets, ``llava.eval.budgets``).
- batches of ``--batch-size`` questions, left-padded; ``--num-chunks/--chunk-idx`` shards the questions.
- resumable: questions already in the answers file are skipped (a run cut short is simply run again);
  ``--overwrite`` starts afresh. Settings that change answers (model, compression, prompt, decoding)
  must match the ones recorded for the file, else the run stops instead of mixing answers.
- ``<answers>.settings.json`` beside the answers records the settings, the counts and the timings.
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
    "chunk_idx",
)


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
    """Refuse to add answers made with other answer-affecting settings to an existing answers file."""
    settings_file = settings_path_for(answers_file)
    if not settings_file.is_file():
        return
    previous = read_json(settings_file)
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


def run_generation(
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
    """Answer ``items`` not yet in ``answers_file`` with ``answer_batch`` (-> [(text, new tokens)]),
    appending one json line per answer, and keep ``<answers>.settings.json`` up to date."""
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
            for item, (text, new_tokens) in zip(batch, outputs):
                answer = {
                    "question_id": item.question_id,
                    "prompt": item.prompt,
                    "text": text,
                    "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {},
                    **item.extra,
                }
                out.write(json.dumps(answer, ensure_ascii=False) + "\n")
                record["generated_tokens"] += int(new_tokens)
            out.flush()
            record["num_answered"] += len(batch)
            write_json(settings_file, record)  # counts and time survive a crash (resuming adds to them)
            bar.update(len(batch))
    bar.close()
    record["status"] = "complete"
    record["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    write_json(settings_file, record)
    return record


class LlavaAnswerer:
    """Loads a LLaVA checkpoint (with its visual-token compression) and answers batches of items."""

    def __init__(self, model_path: str, model_base: str | None, conv_mode: str, compression, device: str,
                 dtype: str, temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1,
                 max_new_tokens: int = 128, seed: int = 0):
        import torch

        from llava.conversation import conv_templates
        from llava.mm_utils import get_model_name_from_path
        from llava.model.builder import load_pretrained_model

        if conv_mode not in conv_templates:
            raise ValueError(f"unknown --conv-mode {conv_mode!r}; known: {sorted(conv_templates)}")
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
        self.conv_template = conv_templates[conv_mode]
        self.temperature, self.top_p, self.num_beams = temperature, top_p, num_beams
        self.max_new_tokens = max_new_tokens
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.unk_token_id or 0)

    def prompt_for(self, item: EvalItem) -> str:
        from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN

        question = item.question
        if item.has_image:
            token = DEFAULT_IMAGE_TOKEN
            if getattr(self.model.config, "mm_use_im_start_end", False):
                token = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
            question = token + "\n" + question
        conv = self.conv_template.copy()
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def __call__(self, batch: list[EvalItem]) -> list[tuple[str, int]]:
        torch = self.torch
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        ids = [tokenizer_image_token(self.prompt_for(item), self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
               for item in batch]
        width = max(len(x) for x in ids)
        # left padding: every prompt ends where generation starts
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = x
            attention_mask[row, width - len(x):] = 1
        kwargs = {}
        if batch[0].has_image:
            pil_images = [item.load_image() for item in batch]
            pixels = process_images(pil_images, self.image_processor, self.model.config)
            if isinstance(pixels, list):
                pixels = [p.to(self.device, dtype=self.dtype) for p in pixels]
            else:
                pixels = pixels.to(self.device, dtype=self.dtype)
            kwargs = {"images": pixels, "image_sizes": [image.size for image in pil_images]}
        sampling = self.temperature > 0
        with torch.inference_mode():
            output_ids = self.model.generate(
                input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                do_sample=sampling,
                temperature=self.temperature if sampling else None,
                top_p=self.top_p if sampling else None,
                num_beams=self.num_beams,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.pad_id,
                use_cache=True,
                **kwargs,
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
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", default=default_format, required=default_format is None,
                        choices=["vqa", "science", "mmbench", "mmmu"], help="question file format")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--model-base", default=None)
    parser.add_argument("--conv-mode", default="vicuna_v1")
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
                        help="none | visionzip:D,C | vispruner:T[,ratio] (see visionzip.CompressionConfig.parse)")
    parser.add_argument("--method", default=None, help="none | visionzip | vispruner, with --budget")
    parser.add_argument("--budget", default=None, help="paper token budget (64, 128, 192; NeXT 160, 320, 640) or D,C")
    parser.add_argument("--budget-family", default="v1.5", choices=["v1.5", "v1.6"],
                        help="which paper budget table --budget refers to")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="discard existing answers instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_compression(args) -> tuple[object, dict]:
    """The CompressionConfig and the budget description to record, from --compression or --method/--budget."""
    from visionzip.config import CompressionConfig

    from .budgets import resolve_budget

    if args.compression is not None and args.method is not None:
        raise ValueError("give either --compression or --method/--budget, not both")
    if args.method is not None:
        run = resolve_budget(args.method, args.budget, args.budget_family)
        return run.compression, {"method": run.method, "budget_label": run.label,
                                 "visual_tokens": run.visual_tokens, "budget_family": args.budget_family}
    config = CompressionConfig.parse(args.compression or "none")
    return config, {"method": config.method, "budget_label": None, "visual_tokens": None,
                    "budget_family": args.budget_family}


def main(argv=None, default_format: str | None = None, default_max_new_tokens: int = 128,
         prog: str = "python -m llava.eval.generate") -> dict:
    parser = build_parser(default_format, default_max_new_tokens, prog)
    args = parser.parse_args(argv)
    try:
        compression, budget = resolve_compression(args)
        fmt = get_format(args.format)
        options = ReaderOptions(args.image_folder, args.single_pred_prompt, args.all_rounds, args.lang)
        items = read_items(fmt, args.question_file, options, args.num_chunks, args.chunk_idx)
        device = resolve_device(args.device)
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
            try:  # checks the settings and marks the shard complete (a crash may have left it "running")
                return run_generation(items, fmt, answers_file, _nothing_to_answer, settings, args.batch_size,
                                      progress=False)
            except ValueError as err:
                parser.exit(2, f"error: {err}\n")
    answerer = LlavaAnswerer(
        args.model_path, args.model_base, args.conv_mode, compression, args.device, args.dtype,
        args.temperature, args.top_p, args.num_beams, args.max_new_tokens, args.seed,
    )
    try:
        record = run_generation(items, fmt, answers_file, answerer, settings, args.batch_size, args.overwrite,
                                model_id=answerer.model_name, progress=not args.no_progress)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{answers_file}: {record['num_answered']}/{record['num_questions']} answered, "
          f"{record['generation_seconds']:.1f} s generating")
    return record


if __name__ == "__main__":
    main()
