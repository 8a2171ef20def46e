"""The toy tower trained the way CLIP is: contrastive image-text pretraining on the toy task's scenes.

A trained CLIP concentrates its [CLS] attention on a few tokens that carry the image (VisionZip Sec. 2 and
Fig. 2; VisPruner Sec. 3): that is the premise of the [CLS]-attention methods, and a random tower lacks it.
``train_clip_tower(settings, folder)`` trains a ``CLIPVisionModel`` in the toy's token geometry (ViT-L/14-336:
336 px, patch 14, 576 patches + CLS; narrow and shallow) against a tiny text encoder with CLIP's symmetric
InfoNCE loss (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
Fig. 3's pseudo-code): the image embedding is the tower's pooled output (the last layer's [CLS] after
``post_layernorm``, what ``CLIPVisionModelWithProjection`` projects), projected linearly; the text
embedding is a one-layer transformer's output at the caption's end token (CLIP's text tower pools there
too), projected linearly; the logits are their cosine similarities times a learned temperature. The
captions are drawn from each scene's own facts (``caption``): how many shapes, their colour, which shapes,
which half ("two red squares and a red circle in the top half"), in a shuffled order of phrases.

Because only the [CLS] token reaches the loss, the tower learns to route what the caption names (the
shapes) into [CLS]: its [CLS] attention concentrates on the shapes' patches. ``cls_attention_shares``
measures that per layer (the share of [CLS] attention held by the top 1 / 5 / 10 % of the patches), from
each layer's queries and keys (``visionzip.scoring.cls_attention``), never ``output_attentions``.

Everything is on the CPU and deterministic in the seed (torch's generator is seeded, scenes come from
``llava.toy.task.make_scene``); the tower is saved with its image processor, like ``build_tiny_llava``'s.
Identical captions in a batch are positives of each other (the target of each row is spread over the
batch's equal captions), since a small caption vocabulary repeats within a batch of 64.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .task import COLOURS, HALVES, TEXT_WORDS, Scene, caption, make_scene, scene_pixels

CAPTION_WORDS = ("<end>", "a", "one", "two", "three", *COLOURS, "square", "squares", "circle", "circles", "and",
                 "in", "the", *HALVES, "half", "shape", "shapes")
TEXT_CAPTION_WORDS = (*CAPTION_WORDS, "word", *TEXT_WORDS)  # the captions of scenes with a word (words=True)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the OpenAI CLIP normalisation (CLIPImageProcessor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOP_SHARES = (1, 5, 10)  # % of the patches whose share of the [CLS] attention is reported


def caption_ids(text: str, length: int = 20, vocabulary: tuple = CAPTION_WORDS) -> list[int]:
    ids = [vocabulary.index(word) for word in text.split()] + [0]  # <end> closes it (CLIP pools there)
    if len(ids) > length:
        raise ValueError(f"caption of {len(ids)} words exceeds {length}: {text!r}")
    return ids + [0] * (length - len(ids))


def pixel_batch(scenes: list[Scene]) -> torch.Tensor:
    """(B, 3, S, S) CLIP-normalised pixels of the scenes (what ``CLIPImageProcessor`` gives for an image
    of the tower's size: no resize or crop)."""
    return normalised_pixels(scene_pixels(scenes))


def normalised_pixels(arrays: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) CLIP-normalised float32 (``pixel_batch``'s second half)."""
    pixels = torch.from_numpy(arrays.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


class TextEncoder(nn.Module):
    """A tiny text tower: word and position embeddings, one pre-LN transformer layer, the mean of its
    outputs over the caption's words (CLIP reads the end token; a mean carries every fact from the first
    step, which a few seconds of training need). (B, L) word ids -> (B, width)."""

    def __init__(self, width: int, length: int = 20, vocabulary: int = len(CAPTION_WORDS)):
        super().__init__()
        self.words = nn.Embedding(vocabulary, width)
        self.positions = nn.Parameter(torch.randn(length, width) * 0.02)
        self.layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        words = (ids != 0).float().unsqueeze(-1)  # the caption's words (0: the end token and padding)
        hidden = self.layer(self.words(ids) + self.positions[: ids.shape[1]], src_key_padding_mask=None)
        return self.norm((hidden * words).sum(dim=1) / words.sum(dim=1))


@dataclass(frozen=True)
class ClipSettings:
    """What decides the contrastive tower (part of the toy's settings hash)."""

    steps: int = 80
    batch_size: int = 32
    learning_rate: float = 2e-3
    embed_dim: int = 32
    text_width: int = 32
    words: bool = False  # scenes with a word, named in their captions (the text question's task)


@dataclass
class ClipTraining:
    losses: list
    retrieval: float  # % of held-out images whose own caption scores highest among the batch's captions
    chance: float  # % retrieval by chance (1 / distinct captions in the held-out batch, mean)
    seconds: float


def _contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, same: torch.Tensor):
    """CLIP's symmetric cross-entropy over the cosine-similarity logits; ``same`` (B, B) marks equal
    captions, which share the target."""
    image = nn.functional.normalize(image, dim=-1)
    text = nn.functional.normalize(text, dim=-1)
    logits = scale.exp().clamp(max=100) * image @ text.t()
    target = same / same.sum(dim=1, keepdim=True)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.t(), target)) / 2


def drawn_ahead(chunks: list[list[Scene]], ahead: int = 2):
    """The pixels (``scene_pixels``) of each chunk of scenes, in order, drawn by a worker process up to
    ``ahead`` chunks ahead of the caller: drawing was about half of a pre-training step (2560 scenes), and
    this way it runs beside the step instead of before it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = [pool.submit(scene_pixels, chunk) for chunk in chunks[:ahead]]
        for index in range(len(chunks)):
            arrays = pending.pop(0).result()
            if index + ahead < len(chunks):
                pending.append(pool.submit(scene_pixels, chunks[index + ahead]))
            yield arrays


def _scenes(seed_stream: str, count: int, image_size: int, words: bool = False) -> tuple[list[Scene], list[str]]:
    rng = random.Random(seed_stream)
    scenes = [make_scene(rng.randrange(2**31), image_size, words) for _ in range(count)]
    return scenes, [caption(scene, rng) for scene in scenes]


def train_clip_tower(tower, settings: ClipSettings, seed: int, printer=print, every: int = 20) -> ClipTraining:
    """Train ``tower`` (a ``CLIPVisionModel``, in place) contrastively against a tiny text encoder on
    ``settings.steps`` batches of fresh scenes; returns the losses and the held-out caption retrieval."""
    image_size = int(tower.config.image_size)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    vocabulary = TEXT_CAPTION_WORDS if settings.words else CAPTION_WORDS
    try:
        text_encoder = TextEncoder(settings.text_width, vocabulary=len(vocabulary))
        image_projection = nn.Linear(tower.config.hidden_size, settings.embed_dim, bias=False)
        text_projection = nn.Linear(settings.text_width, settings.embed_dim, bias=False)
        scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    finally:
        torch.random.set_rng_state(state)
    modules = nn.ModuleList([tower, text_encoder, image_projection, text_projection])
    parameters = [*modules.parameters(), scale]
    optimiser = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.1)
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, settings.steps) / settings.steps)))
    scenes, captions = _scenes(f"clip-{seed}", settings.steps * settings.batch_size, image_size, settings.words)
    tower.train()
    losses = []
    start = time.perf_counter()
    chunks = [slice(step * settings.batch_size, (step + 1) * settings.batch_size) for step in range(settings.steps)]
    # closed (the worker stopped) as soon as the loop ends, by an error too
    with contextlib.closing(drawn_ahead([scenes[chunk] for chunk in chunks])) as batches:
        for step, chunk in enumerate(chunks):
            pixels = normalised_pixels(next(batches))
            ids = torch.tensor([caption_ids(c, vocabulary=vocabulary) for c in captions[chunk]])
            same = (ids[:, None, :] == ids[None, :, :]).all(-1).float()
            image = image_projection(tower(pixel_values=pixels).pooler_output)
            loss = _contrastive_loss(image, text_projection(text_encoder(ids)), scale, same)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            if (step + 1) % every == 0 or step + 1 == settings.steps:
                printer(f"  contrastive tower: step {step + 1}/{settings.steps}, loss {losses[-1]:.3f} "
                        f"[{time.perf_counter() - start:.0f} s]", flush=True)
    tower.eval()
    retrieval, chance = caption_retrieval(tower, text_encoder, image_projection, text_projection, seed, image_size,
                                          words=settings.words)
    return ClipTraining(losses, retrieval, chance, time.perf_counter() - start)


@torch.no_grad()
def caption_retrieval(tower, text_encoder, image_projection, text_projection, seed: int, image_size: int,
                      count: int = 64, words: bool = False) -> tuple[float, float]:
    """Held-out scenes (another seed stream): % whose own caption (or an equal one) is the best match
    among the ``count`` captions, and the chance of that (mean of equal captions / count)."""
    scenes, captions = _scenes(f"clip-eval-{seed}", count, image_size, words)
    vocabulary = TEXT_CAPTION_WORDS if words else CAPTION_WORDS
    # the facts, not the phrase order, decide a match: an image's caption set is the captions with its facts
    facts = [(len(s.objects), s.objects[0].colour, s.half, tuple(sorted(o.shape for o in s.objects)), s.word)
             for s in scenes]
    image = nn.functional.normalize(image_projection(tower(pixel_values=pixel_batch(scenes)).pooler_output), dim=-1)
    ids = torch.tensor([caption_ids(c, vocabulary=vocabulary) for c in captions])
    text = nn.functional.normalize(text_projection(text_encoder(ids)), dim=-1)
    best = (image @ text.t()).argmax(dim=1).tolist()
    hits = sum(facts[j] == facts[i] for i, j in enumerate(best))
    chance = sum(sum(f == g for g in facts) for f in facts) / count
    return 100.0 * hits / count, 100.0 * chance / count


@torch.no_grad()
def cls_attention_shares(tower, pixel_values: torch.Tensor, tops=TOP_SHARES) -> list[dict]:
    """Per layer of ``tower`` (a CLIP vision model), the share (%) of the [CLS] query's attention to the
    patches that the top ``t`` % of the patches hold, for each ``t`` in ``tops``: averaged over heads and
    images. The CLS row of each layer is recomputed from that layer's q and k (``cls_attention``), as the
    methods score it; the tower runs its own (SDPA) attention. Returns [{t: share}] per layer, first first."""
    from visionzip.encoders import encoder_adapter
    from visionzip.scoring import cls_attention

    adapter = encoder_adapter(tower)
    hidden = adapter.embed(pixel_values.to(next(tower.parameters()).dtype))
    shares = []
    for index, layer in enumerate(adapter.layers):
        q, k, scale = adapter.queries_keys(index, adapter.attention_input(index, hidden), slice(0, 1))
        to_patches = cls_attention(q, k, scale)[..., 1:].mean(dim=1)  # (B, 576): heads averaged
        to_patches = to_patches / to_patches.sum(dim=-1, keepdim=True)
        ranked = to_patches.sort(dim=-1, descending=True).values.cumsum(dim=-1)
        patches = ranked.shape[-1]
        shares.append({t: 100.0 * float(ranked[:, max(1, round(patches * t / 100)) - 1].mean()) for t in tops})
        hidden = layer(hidden, None)
    return shares


def shares_table(rows: list[tuple[str, list[dict]]], tops=TOP_SHARES) -> str:
    """A markdown table: one row per (tower, layer), the share of [CLS] attention held by the top t %."""
    lines = ["| tower | layer | " + " | ".join(f"top {t} %" for t in tops) + " |", "|---" * (len(tops) + 2) + "|"]
    for name, shares in rows:
        for index, layer in enumerate(shares):
            depth = len(shares)
            label = f"{index + 1} of {depth}" + (" (-2: LLaVA's features)" if index == depth - 2 else "")
            lines.append(f"| {name} | {label} | " + " | ".join(f"{layer[t]:.1f}" for t in tops) + " |")
    uniform = " / ".join(f"{t:.0f} %" for t in tops)
    return "\n".join(lines) + f"\n\nA uniform attention gives {uniform}.\n"


def save_training_record(path: Path, training: ClipTraining) -> None:
    from llava.utils_io import atomic_write_text

    atomic_write_text(path, json.dumps({"losses": training.losses, "retrieval": training.retrieval,
                                        "chance": training.chance, "seconds": training.seconds}, indent=1))
