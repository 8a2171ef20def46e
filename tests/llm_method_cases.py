"""What the in-LLM method tests share (FastV, PDrop, SparseVLM, DART, DivPrune, CDPruner, and the
transformers families' loop): the prompts and images of a left-padded batch, the batch spliced with each
sample alone, and a pruner that replays a prefill's selection (what decoding on the pruned KV cache must
compute, without a cache). Imported by the test modules (pytest puts ``tests/`` on the import path)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from llava.conversation import get_conv_template
from llava.mm_utils import process_images, tokenizer_image_token
from llava.model.builder import load_pretrained_model
from llava.model.llava_arch import SplicedInputs
from llava.model.tiny import build_tiny_llava
from visionzip.llm import Selection

QUESTIONS = ["What is in the picture?", "Describe the colors you see, in detail, please.", "Why?"]


def tiny_models(root, layers: int = 4, hidden: int = 64) -> dict:
    """Tiny random LLaVA-1.5 and LLaVA-NeXT (SDPA) built under ``root``: version -> what
    ``load_pretrained_model`` returns (tokenizer, model, image processor, context length)."""
    out = {}
    for version in ("v1.5", "v1.6"):
        path = build_tiny_llava(str(root / version), version, hidden=hidden, layers=layers)
        out[version] = load_pretrained_model(path, None, None, device="cpu", attn_implementation="sdpa")
    return out


def spliced_per_version(models: dict) -> dict:
    """version -> (the left-padded batch of 3 spliced, each sample alone) on ``models``, uncompressed."""
    out = {}
    for version, (tokenizer, model, processor, _) in models.items():
        model.set_visual_compression(None)
        out[version] = splice_batch(model, processor, tokenizer)[:2]
    return out


def prompt_ids(tokenizer, question: str) -> torch.Tensor:
    """The vicuna_v1 prompt of ``question`` after one image, in the original's ids (-200 for the image)."""
    conv = get_conv_template("vicuna_v1")
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    return tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")


def make_images(seed: int = 3, sizes=((600, 300), (336, 336), (300, 600))) -> list[Image.Image]:
    """Random images; on LLaVA-NeXT these are 3, 5 and 3 views."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for w, h in sizes]


def splice_batch(model, processor, tokenizer, questions=QUESTIONS, images=None):
    """The prompts of ``questions`` (one image each) as one left-padded batch, spliced by ``model``, and each
    sample alone, unpadded (its rows of the batch: the tower's output does not depend on the batch).
    Returns (SplicedInputs of the batch, [SplicedInputs of each sample], left padding of each row)."""
    images = make_images() if images is None else images
    ids = [prompt_ids(tokenizer, q) for q in questions]
    longest = max(len(i) for i in ids)
    batch = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, sample in enumerate(ids):
        batch[row, : len(sample)] = sample
        mask[row, : len(sample)] = 1
    pixels = process_images(images, processor, model.config)
    with torch.no_grad():
        both = model.splice_multimodal(batch, pixels, [im.size for im in images], mask, padding_side="left")
    pad = (~both.attention_mask.bool()).sum(dim=1).tolist()
    singles = [
        SplicedInputs(both.inputs_embeds[row : row + 1, p:], None, None, None, both.visual_mask[row : row + 1, p:])
        for row, p in enumerate(pad)
    ]
    return both, singles, pad


class ReplayPruner:
    """Records the keep masks a pruner chose on a prefill and replays them on the same prefill with
    ``extra`` tokens appended (what decoding on the pruned KV cache must compute, without a cache)."""

    def __init__(self, pruner):
        self.inner = pruner
        self.layers = tuple(pruner.layers)
        self.keep_original_positions = pruner.keep_original_positions
        self.recorded = {}
        self.extra = 0

    def score_layer(self, layer):
        return self.inner.score_layer(layer)

    def select(self, context):
        if self.extra == 0:
            keep = self.inner.select(context)
            self.recorded[context.layer] = keep
            return keep
        recorded = self.recorded[context.layer]
        keep = recorded.keep if isinstance(recorded, Selection) else recorded
        keep = torch.cat([keep, keep.new_ones(keep.shape[0], self.extra)], dim=1)
        if isinstance(recorded, Selection):
            return Selection(keep, recorded.extra, recorded.extra_valid, recorded.insert_after)
        return keep


def replay_decoding(model, tokenizer, both: SplicedInputs, replay: ReplayPruner, cache, chunk_tokens: int = 4,
                    steps: int = 2, atol: float = 1e-4) -> None:
    """Decoding on the KV cache a pruned prefill left equals replaying the prefill's selection without a cache.

    ``cache``: what ``model.get_model().pruned_forward(..., use_cache=True, ..., replay)`` returned for the
    spliced batch ``both`` (left padded). Runs a chat-style chunk of ``chunk_tokens`` tokens (a later turn:
    never pruned) and ``steps`` greedy steps on it, then for each of them the whole sequence without a cache
    with ``replay`` replaying the prefill's keep masks: the last-token logits agree within ``atol``."""
    llm = model.get_model()
    embeds, mask, positions = both.inputs_embeds, both.attention_mask.bool(), both.position_ids
    batch = embeds.shape[0]
    chunk = torch.tensor([tokenizer("Tell me more", add_special_tokens=False).input_ids[:chunk_tokens]] * batch)
    new_ids = [chunk]
    logits = model(input_ids=chunk, attention_mask=torch.cat([mask, torch.ones_like(chunk, dtype=torch.bool)], 1),
                   position_ids=positions[:, -1:] + 1 + torch.arange(chunk.shape[1]), cache=cache,
                   use_cache=True).logits
    cached = [logits[:, -1]]
    for _ in range(steps):
        token = cached[-1].argmax(-1, keepdim=True)
        new_ids.append(token)
        total = sum(t.shape[1] for t in new_ids)
        cached.append(model(input_ids=token, attention_mask=torch.cat([mask, torch.ones(batch, total, dtype=torch.bool)], 1),
                            position_ids=positions[:, -1:] + total, cache=cache, use_cache=True).logits[:, -1])
    all_ids = torch.cat(new_ids, dim=1)
    for step, expected in enumerate(cached):
        extra = chunk.shape[1] + step
        replay.extra = extra
        full = torch.cat([embeds, llm.embed_tokens(all_ids[:, :extra])], dim=1)
        full_mask = torch.cat([mask, torch.ones(batch, extra, dtype=torch.bool)], 1)
        full_positions = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], 1)
        full_visual = torch.cat([both.visual_mask, torch.zeros(batch, extra, dtype=torch.bool)], 1)
        out = llm.pruned_forward(full, full_mask, full_positions, None, False, full_visual, replay)
        torch.testing.assert_close(model.lm_head(out.last_hidden_state[:, -1]), expected, atol=atol, rtol=0)
    replay.extra = 0
