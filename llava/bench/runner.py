"""Measure one method on one model and batch: every stage of a LLaVA request, and a lean-path audit.

Stages (medians over ``repeats`` after ``warmup``; peak memory above what was in use before the call):

- ``original_tower``: the vanilla tower as the original LLaVA runs it (SDPA, all layers, all hidden
  states kept); ``tower``: the vanilla tower as this LLaVA runs it (``VisionTower.encode`` without
  compression: stops after the selected layer); ``step``: the compression step (tower + selection +
  merge; for ``official`` rows the official path re-enacted). The three are measured round by round in
  the same process, so that their ratios are robust to load drift; ``overhead`` = step - tower.
- ``projector``: the projector on the step's output tokens.
- ``prefill``: the LLM forward over the spliced sequence (KV cache on, logits of the last position only,
  as ``generate`` does), then ``decode``: greedy single-token steps on that cache, per token.
- ``ttft``: ``generate(max_new_tokens=1)`` (tower, compression, projector, splice, prefill, first token);
  ``generate``: ``generate(max_new_tokens=N, min_new_tokens=N)`` end to end, with its peak memory.
"""
from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode, resolve_name

from visionzip import CompressionConfig
from visionzip.profiling import PeakMemory, measure, measure_interleaved, synchronize, timed_call

from .geometry import kv_cache_bytes, llm_layer_flops
from .roofline import model_shape
from .setup import BenchInputs, BenchMethod
from .syncs import HostSyncAudit

STAGES = ("vision", "projector", "prefill", "generate", "audit")


@dataclass
class Settings:
    repeats: int = 5
    warmup: int = 1
    new_tokens: int = 16
    device: str = "cpu"
    stages: tuple[str, ...] = STAGES
    compile_backend: str = "inductor"  # for the compiled rows (--compile)


def cache_bytes(cache) -> int:
    """Bytes held by a KV cache (transformers ``Cache`` with ``.layers``, or legacy tuples)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)
    return sum(t.numel() * t.element_size() for pair in cache for t in pair)


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


# ----- the lean-path audit ----------------------------------------------------------------------
# Tensor calls that make the host wait for the device (on CUDA): reading a value (item, int(t), tolist,
# bool(t)), or anything whose output size depends on the data (nonzero, boolean-mask indexing, 1-arg
# where, masked_select, unique). Found at the Python API level, so a CPU run finds what a CUDA run would do.
SYNC_CALLS = {
    "torch.Tensor.item", "torch.Tensor.__int__", "torch.Tensor.__float__", "torch.Tensor.__bool__",
    "torch.Tensor.__index__", "torch.Tensor.tolist", "torch.Tensor.numpy", "torch.Tensor.nonzero", "torch.nonzero",
    "torch.Tensor.masked_select", "torch.masked_select", "torch.unique", "torch.Tensor.unique",
}
SOFTMAX_CALLS = {"torch.nn.functional.softmax", "torch.softmax", "torch.Tensor.softmax", "torch._softmax"}
MATMUL_CALLS = {"torch.bmm", "torch.matmul", "torch.Tensor.bmm", "torch.Tensor.matmul", "torch.Tensor.__matmul__"}


def _is_bool_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


class OpAudit(TorchFunctionMode):
    """Counts, for every torch call in a block: host syncs, softmaxes over an (N x N) map, and matrix
    products with an operand whose last two dims are ``merge_shape``."""

    def __init__(self, num_tokens: int, merge_shape: tuple[int, int] | None):
        super().__init__()
        self.num_tokens = num_tokens
        self.merge_shape = list(merge_shape) if merge_shape else None
        self.host_syncs: list[str] = []
        self.full_attention_maps = 0
        self.one_hot_products = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = resolve_name(func) or repr(func)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in SYNC_CALLS:
            self.host_syncs.append(name)
        elif name == "torch.where" and len(args) + len(kwargs) == 1:
            self.host_syncs.append("torch.where(condition)")
        elif name == "torch.Tensor.__getitem__":
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, (tuple, list)) else (index,)
            if any(_is_bool_tensor(p) for p in parts):
                self.host_syncs.append("boolean-mask indexing")
        elif name in ("torch.Tensor.cpu", "torch.Tensor.to") and tensors and tensors[0].device.type != "cpu":
            target = [a for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, (str, torch.device))]
            if name == "torch.Tensor.cpu" or any(torch.device(t).type == "cpu" for t in target):
                self.host_syncs.append("device-to-host copy")
        if name in SOFTMAX_CALLS and tensors and list(tensors[0].shape[-2:]) == [self.num_tokens] * 2:
            self.full_attention_maps += 1
        if name in MATMUL_CALLS and self.merge_shape and any(list(t.shape[-2:]) == self.merge_shape for t in tensors):
            self.one_hot_products += 1
        return func(*args, **kwargs)


def audit_call(fn, tower_model, num_tokens: int, merge_shape: tuple[int, int] | None, device: str) -> dict:
    """Run ``fn`` once and count what a lean path must not do.

    full_attention_maps: softmaxes over an (N x N) map of the tower's N tokens (eager attention, or a
    scored layer computed in full). host_syncs: calls that wait for the device (see ``SYNC_CALLS``);
    aten_host_syncs: the same counted per ATen operator (``llava.bench.syncs.HostSyncAudit``: sees the
    reads inside library calls too); host_copies: tensors made from host data (host-to-device copies).
    dense_one_hot_merge: a matrix product with an operand of shape (B, contextual, remaining - contextual),
    i.e. the official one-hot merge. tower_passes / layers_run: forward calls of the tower's embeddings and
    encoder layers (one pass per batch: no loop over images). cuda_sync_warnings: on CUDA, synchronising
    calls reported by ``torch.cuda.set_sync_debug_mode`` (it also sees host-to-device copies).
    """
    core = getattr(tower_model, "vision_model", tower_model)
    counts = {"tower_passes": 0, "layers_run": 0}

    def count(key):
        def hook(module, args, output):
            counts[key] += 1

        return hook

    handles = [core.embeddings.register_forward_hook(count("tower_passes"))]
    handles += [layer.register_forward_hook(count("layers_run")) for layer in core.encoder.layers]
    on_cuda = torch.device(device).type == "cuda"
    audit = OpAudit(num_tokens, merge_shape)
    aten = HostSyncAudit()  # the same question at the ATen level (library code included; llava.bench.syncs)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if on_cuda:
                synchronize(device)
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with audit, aten:
                    fn()
            finally:
                if on_cuda:
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        for handle in handles:
            handle.remove()
    return {
        "full_attention_maps": audit.full_attention_maps,
        "host_syncs": len(audit.host_syncs),
        "host_sync_calls": sorted(set(audit.host_syncs)),
        "aten_host_syncs": aten.count,
        "aten_host_sync_calls": sorted(aten.summary()),
        "host_copies": len(aten.host_copies),
        "dense_one_hot_merge": audit.one_hot_products > 0,
        "tower_passes": counts["tower_passes"],
        "layers_run": counts["layers_run"] // max(counts["tower_passes"], 1),
        "cuda_sync_warnings": sum("synchroniz" in str(w.message).lower() for w in caught) if on_cuda else None,
    }


# ----- one method ---------------------------------------------------------------------------------
def compression_step(model, inputs: BenchInputs, method: BenchMethod):
    """The callable that turns the views into compressed (pre-projector) tokens, and those tokens' shape
    info for the audit: (step_fn, merge_shape or None)."""
    tower = model.get_vision_tower()
    views = inputs.views
    c = method.compression
    if method.official:
        return lambda: c.settings.reference_tokens(tower.vision_tower, views, tower.select_layer)
    return lambda: tower.encode(views, c if c.enabled else None)[0]


def merge_shape(tower, compression) -> tuple[int, int] | None:
    """The last two dims of the dense merge operand the official code path builds, if any."""
    if not compression.enabled:
        return None
    return compression.settings.reference_merge_shape(tower.num_patches + int(tower.has_cls))


def run_method(model, inputs: BenchInputs, method: BenchMethod, settings: Settings) -> dict:
    """All stages for one method; returns a flat dict (seconds, MiB, counts)."""
    device = settings.device
    tower = model.get_vision_tower()
    c = method.compression
    model.set_visual_compression(None if method.official else c)
    config = model.config
    layers = int(config.num_hidden_layers)
    hidden, intermediate = int(config.hidden_size), int(config.intermediate_size)
    views_per_sample = inputs.views.shape[0] // inputs.batch
    row: dict = {
        "method": method.spec, "spec": c.spec(), "label": method.label, "official": method.official,
        "batch": inputs.batch,
        "views_per_sample": views_per_sample, "text_tokens": inputs.text_tokens, "llm_layers": layers,
        "dtype": str(tower.dtype).replace("torch.", ""), "device": device,
    }
    row.update(model_shape(model))  # for the roofline bounds (llava.bench.roofline)
    step = compression_step(model, inputs, method)
    repeats, warmup = settings.repeats, settings.warmup
    with torch.no_grad():
        if "vision" in settings.stages:
            views = inputs.views
            # a copy of the tower for the original LLaVA's call: asked for hidden states once, a transformers
            # model keeps output-capturing hooks on its layers, which dynamo cannot trace, so that the
            # captured image path of the compiled rows (same model, same process) would fall back to eager
            original_tower = copy.deepcopy(tower.vision_tower)
            calls = {
                # the original LLaVA: all layers, every hidden state kept, hidden_states[select_layer] read
                "original_tower": lambda: original_tower(views, output_hidden_states=True).hidden_states[
                    tower.select_layer],
                "tower": compression_step(model, inputs, BenchMethod("none", type(c)())),
            }
            if not method.is_vanilla:
                calls["step"] = step
            m = measure_interleaved(calls, repeats=repeats, warmup=warmup, device=device)
            del original_tower, calls
            stepm, towerm, originalm = m.get("step", m["tower"]), m["tower"], m["original_tower"]
            row.update(
                original_tower_s=originalm.median, original_tower_peak_mib=originalm.peak_mib,
                tower_s=towerm.median, tower_peak_mib=towerm.peak_mib,
                step_s=stepm.median, step_peak_mib=stepm.peak_mib,
                overhead_s=stepm.median - towerm.median,
                step_vs_tower=stepm.median / towerm.median,
                step_mem_vs_tower=stepm.peak_mib / max(towerm.peak_mib, 1e-9),
                step_vs_original=stepm.median / originalm.median,
                step_mem_vs_original=stepm.peak_mib / max(originalm.peak_mib, 1e-9),
            )
        if "projector" in settings.stages:
            features = step()
            projector = model.get_model().mm_projector
            row["projector_s"] = measure(lambda: projector(features), repeats=repeats, warmup=warmup, device=device).median

        if method.official:
            # same token count as the matching method: the LLM side is measured on that row
            visual = views_per_sample * c.tokens_per_image
            row.update(visual_tokens=visual, seq_len=visual + inputs.text_tokens)
        else:
            spliced = model.splice_multimodal(
                inputs.input_ids, inputs.images, inputs.image_sizes, padding_side="left"
            )
            embeds, attention_mask, position_ids = spliced.inputs_embeds, spliced.attention_mask, spliced.position_ids
            row.update(seq_len=embeds.shape[1], visual_tokens=embeds.shape[1] - inputs.text_tokens)
        n = row["seq_len"]
        row.update(
            llm_flops_per_layer=llm_layer_flops(n, hidden, intermediate),
            llm_flops=layers * llm_layer_flops(n, hidden, intermediate),
        )
        if c.enabled and c.settings.stage == "llm":
            # in-LLM methods: FastV's formula, the visual tokens of each layer from the method's schedule
            row["llm_view_tokens"] = tower.num_patches
            row["llm_visual_schedule"] = c.settings.llm_token_schedule(layers, row["visual_tokens"], tower.num_patches)
            row["llm_flops"] = schedule_flops(row, layers, hidden, intermediate)
            row["llm_flops_per_layer"] = row["llm_flops"] / layers
        if not method.official and "prefill" in settings.stages:
            row.update(measure_prefill_decode(model, embeds, attention_mask, position_ids, settings, spliced.visual_mask))
            heads = int(config.num_attention_heads)
            row["kv_cache_analytic_mib"] = mib(kv_cache_bytes(
                n, layers, int(getattr(config, "num_key_value_heads", None) or heads), hidden // heads,
                inputs.batch, embeds.element_size()))
        if not method.official and "generate" in settings.stages:
            row.update(measure_generate(model, inputs, settings))
        if "audit" in settings.stages:
            row.update(audit_method(model, inputs, method, step))
    return row


def schedule_flops(row: dict, layers: int, hidden: int, intermediate: int) -> int:
    """An in-LLM method's prefill FLOPs over ``layers`` layers: text tokens plus the visual tokens its
    schedule gives each layer (``row["spec"]``, ``row["visual_tokens"]``, ``row["llm_view_tokens"]``)."""
    settings = CompressionConfig.parse(row["spec"]).settings
    text = row["seq_len"] - row["visual_tokens"]
    schedule = settings.llm_token_schedule(layers, row["visual_tokens"], row["llm_view_tokens"])
    return sum(llm_layer_flops(text + visual, hidden, intermediate) for visual in schedule)


def measure_prefill_decode(model, embeds, attention_mask, position_ids, settings: Settings, visual_mask=None) -> dict:
    """Prefill, then ``new_tokens`` greedy decode steps on its cache, timed apart. Every round needs a
    fresh prefill for a fresh cache: ``warmup`` rounds, one untimed prefill watching peak memory (and the
    KV cache it builds), then ``repeats`` timed rounds. ``visual_mask``: where the visual tokens sit (in-LLM
    methods prune in the prefill; the KV cache measured is the pruned one)."""
    device = settings.device
    holder = {}

    def prefill():
        holder["out"] = model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, visual_mask=visual_mask,
        )

    def decode():
        decode_steps(model, holder.pop("out"), attention_mask, position_ids, settings.new_tokens)

    for _ in range(settings.warmup):
        prefill()
        decode()
    with PeakMemory(device) as memory:
        prefill()
    kv = cache_bytes(holder.pop("out").cache)
    prefill_times, decode_times = [], []
    for _ in range(settings.repeats):
        prefill_times.append(timed_call(prefill, device))
        decode_times.append(timed_call(decode, device) / settings.new_tokens)
    return {
        "prefill_s": statistics.median(prefill_times), "prefill_peak_mib": mib(memory.peak_bytes),
        "kv_cache_mib": mib(kv), "decode_s_per_token": statistics.median(decode_times),
    }


def decode_steps(model, out, attention_mask, position_ids, steps: int) -> None:
    """Greedy decoding on ``out``'s cache; the next token stays on the device (no host round trip)."""
    cache = out.cache
    token = out.logits[:, -1:].argmax(dim=-1)
    positions = None if position_ids is None else position_ids[:, -1:]
    for _ in range(steps):
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        if positions is not None:
            positions = positions + 1
        out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions,
                    cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(dim=-1)


def measure_generate(model, inputs: BenchInputs, settings: Settings) -> dict:
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    # the prompt's host copy (``LlavaInputs.generate_kwargs``), as a server holds it from its tokenizer: the
    # splice reads the spliced width on the host (no host sync in the image path and the splice), as the
    # compiled rows do
    common = dict(images=inputs.images, image_sizes=inputs.image_sizes, do_sample=False, pad_token_id=pad,
                  use_cache=True, host_input_ids=inputs.input_ids.cpu())
    new_tokens = settings.new_tokens
    holder = {}

    def first_token():
        model.generate(inputs.input_ids, max_new_tokens=1, **common)

    def full():
        # random weights may emit EOS at any step: min_new_tokens makes every run decode N tokens
        holder["ids"] = model.generate(inputs.input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **common)

    ttft = measure(first_token, repeats=settings.repeats, warmup=settings.warmup, device=settings.device)
    gen = measure(full, repeats=settings.repeats, warmup=settings.warmup, device=settings.device)
    return {
        "ttft_s": ttft.median, "generate_s": gen.median, "generate_peak_mib": gen.peak_mib,
        "generated_tokens": int(holder["ids"].shape[-1]),
    }


def audit_method(model, inputs: BenchInputs, method: BenchMethod, step) -> dict:
    tower = model.get_vision_tower()
    num_tokens = tower.num_patches + 1
    shape = merge_shape(tower, method.compression)
    encode = audit_call(step, tower.vision_tower, num_tokens, shape, inputs.views.device.type)
    out = {f"audit_{k}": v for k, v in encode.items()}
    if not method.official:
        # the whole image path of a request: encode + projector + splice into the text embeddings, with
        # the output width known on the host (as a server knows it from the prompts it tokenized:
        # ``spliced_length``), and without it (the splice then reads it once)
        with torch.no_grad():
            width = model.splice_multimodal(
                inputs.input_ids, inputs.images, inputs.image_sizes, padding_side="left").inputs_embeds.shape[1]

        def splice(length=None):
            model.splice_multimodal(inputs.input_ids, inputs.images, inputs.image_sizes, padding_side="left",
                                    length=length)

        whole = audit_call(lambda: splice(width), tower.vision_tower, num_tokens, shape, inputs.views.device.type)
        unknown = audit_call(splice, tower.vision_tower, num_tokens, shape, inputs.views.device.type)
        out["audit_request_host_syncs"] = whole["aten_host_syncs"]
        out["audit_request_host_sync_calls"] = whole["aten_host_sync_calls"]
        out["audit_request_host_syncs_width_unknown"] = unknown["aten_host_syncs"]
        out["audit_request_host_copies"] = whole["host_copies"]
        out["audit_request_tower_passes"] = whole["tower_passes"]
    return out


# ----- the compiled path (--compile) --------------------------------------------------------------
def run_compiled(model, inputs: BenchInputs, method: BenchMethod, settings: Settings, compiled) -> dict:
    """The LLM side of one method on the compiled path (``llava.model.compiled.CompiledLlava``), measured
    as the eager row is: prefill (bucket-padded, static cache), decode per token, TTFT and generate(N);
    and, with the "vision" stage, the image path's stages 1-2 captured vs eager, vanilla vs compressed
    (``measure_image_path``: the issue's "compression step <= 1.03x the vanilla tower"). TTFT and generate
    run the captured image path (``CompiledLlava.project_views``) and pass the prompt's host copy, so that
    their image path and splice make no host sync. Warm-up is at least 2 rounds: the first compiles (and
    on CUDA the next records the graphs)."""
    import math

    from llava.model.compiled import CACHE_ROUNDING, bucket_length

    model.set_visual_compression(method.compression)
    config = model.config
    layers, hidden, intermediate = int(config.num_hidden_layers), int(config.hidden_size), int(config.intermediate_size)
    row: dict = {
        "method": method.spec, "spec": method.compression.spec(), "label": method.label + " +compile",
        "official": False, "compiled": True, "compile_backend": compiled.backend, "compile_mode": compiled.mode,
        "batch": inputs.batch, "views_per_sample": inputs.views.shape[0] // inputs.batch,
        "text_tokens": inputs.text_tokens, "llm_layers": layers,
        "dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""), "device": settings.device,
    }
    row.update(model_shape(model))
    device, new_tokens = settings.device, settings.new_tokens
    warmup = max(settings.warmup, 2)
    with torch.no_grad():
        embeds, mask = compiled.prompt_embeddings(inputs.input_ids, inputs.images, inputs.image_sizes, None)
        n = embeds.shape[1]
        bucket = bucket_length(n, compiled.buckets)
        row.update(seq_len=n, visual_tokens=n - inputs.text_tokens, prefill_bucket=bucket,
                   llm_flops_per_layer=llm_layer_flops(n, hidden, intermediate),
                   llm_flops=layers * llm_layer_flops(n, hidden, intermediate))
        if "vision" in settings.stages:
            row.update(measure_image_path(model, inputs.views, method.compression, compiled, settings, warmup))
        if "prefill" in settings.stages:
            cache_len = math.ceil((bucket + new_tokens) / CACHE_ROUNDING) * CACHE_ROUNDING
            embed_tokens = model.get_input_embeddings()
            holder = {}

            def prefill():
                holder["session"] = compiled.session(inputs.batch, cache_len)
                holder["token"] = holder["session"].feed(embeds, mask).argmax(dim=-1)

            def decode():
                session, token = holder.pop("session"), holder.pop("token")
                for _ in range(new_tokens):
                    token = session.feed(embed_tokens(token[:, None])).argmax(dim=-1)

            for _ in range(warmup):
                prefill()
                decode()
            prefill_times, decode_times = [], []
            for _ in range(settings.repeats):
                prefill_times.append(timed_call(prefill, device))
                decode_times.append(timed_call(decode, device) / new_tokens)
            row.update(prefill_s=statistics.median(prefill_times), decode_s_per_token=statistics.median(decode_times),
                       kv_cache_mib=mib(cache_bytes(compiled.cache_for(inputs.batch, cache_len))))
        if "generate" in settings.stages:
            # the prompt's host copy, as a server holds it from its tokenizer: the image path and the splice
            # then make no host sync (the eager rows' generate reads the spliced width once)
            common = dict(images=inputs.images, image_sizes=inputs.image_sizes, eos_token_id=None,
                          host_input_ids=inputs.input_ids.cpu())
            holder = {}

            def full():  # eos_token_id=None: every run decodes N tokens (min_new_tokens of the eager row)
                holder["ids"] = compiled.generate(inputs.input_ids, max_new_tokens=new_tokens, **common)

            ttft = measure(lambda: compiled.generate(inputs.input_ids, max_new_tokens=1, **common),
                           repeats=settings.repeats, warmup=warmup, device=device)
            gen = measure(full, repeats=settings.repeats, warmup=warmup, device=device)
            row.update(ttft_s=ttft.median, generate_s=gen.median, generate_peak_mib=gen.peak_mib,
                       generated_tokens=int(holder["ids"].shape[-1]))
    return row


def measure_image_path(model, views, compression, compiled, settings: Settings, warmup: int) -> dict:
    """The image path's stages 1-2 on ``views`` (B * V, 3, S, S): tower + vision-side compression +
    projector (``project_views``), four ways, in one process round by round (the order alternating, so
    that load drift hits all alike): captured (``CompiledLlava.project_views``: one graph per (compression,
    views shape)) and eager (``model.project_views``), each vanilla (the tower up to the selected layer,
    then the projector) and with ``compression``. The compression is switched before each call, outside
    the timed part. Medians over ``settings.repeats`` after ``warmup`` rounds (the first captures the
    graphs; on CUDA the next records them), with min and max; ratios of the medians of this run:
    ``image_step_vs_tower`` (captured; the issue's target, <= 1.03 at batch 1) and
    ``eager_image_step_vs_tower``. ``image_path_eager``: dynamo's reason where the captured path fell back
    to eager (then the captured figures are eager ones), else None."""
    calls = {"image_tower": (compiled.project_views, None), "eager_image_tower": (model.project_views, None)}
    if compression.enabled:
        calls.update(image_step=(compiled.project_views, compression),
                     eager_image_step=(model.project_views, compression))
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        with torch.no_grad():
            for round_index in range(warmup + settings.repeats):
                for name in names if round_index % 2 == 0 else names[::-1]:
                    project, setting = calls[name]
                    model.set_visual_compression(setting)
                    elapsed = timed_call(lambda project=project: project(views), settings.device)
                    if round_index >= warmup:
                        times[name].append(elapsed)
    finally:
        model.set_visual_compression(compression)
    out: dict = {}
    for name in names:
        out[f"{name}_s"] = statistics.median(times[name])
        out[f"{name}_min_s"], out[f"{name}_max_s"] = min(times[name]), max(times[name])
    if compression.enabled:
        out["image_step_vs_tower"] = out["image_step_s"] / out["image_tower_s"]
        out["eager_image_step_vs_tower"] = out["eager_image_step_s"] / out["eager_image_tower_s"]
    out["image_tower_compiled_vs_eager"] = out["image_tower_s"] / out["eager_image_tower_s"]
    reasons = compiled.eager_image_paths
    fell_back = [spec for spec in {c.spec() for _, c in calls.values() if c is not None} | {"none"} if spec in reasons]
    out["image_path_eager"] = "; ".join(f"{spec}: {reasons[spec]}" for spec in sorted(fell_back)) or None
    return out
