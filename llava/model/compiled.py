"""The compiled inference path: a static KV cache and ``torch.compile`` over the LLM's forward.

Eager generation spends most of a batch-1 request in Python and kernel launches, not in arithmetic, so
dropping visual tokens barely shows on the wall clock. This path keeps every shape the LLM sees fixed,
so that ``torch.compile`` traces it once per shape and, on CUDA (``mode="reduce-overhead"``), replays it
as a CUDA graph:

- the KV cache is transformers' ``StaticCache`` (buffers of ``max_cache_len`` slots, written in place),
  initialised before the first compiled call and reused (``reset()``) across requests of the same
  (batch, length), so the compiled graphs see the same buffers every time;
- the attention mask is one (B, max_cache_len) "slot mask" for the whole cache: 1 where a slot holds a
  real token, 0 for padding; slots not written yet are hidden by causality (the cache's write offset);
- a prefill of n tokens is left-padded to a *bucket* length (``PREFILL_BUCKETS``: powers of two from
  64), so that a stream of requests of any length compiles at most one graph per bucket; the padded
  slots stay masked for the rest of the request. Decode steps are one token: a single graph.
- RoPE positions are counted per sample over real tokens only (``next_position``), so left padding,
  bucket padding and a multi-turn chat's earlier turns all give the positions eager generation gives.

One ``torch.compile`` call per (batch, input length, cache length), each with ``isolate_recompiles=True``
so that it counts its own graphs: dynamo's recompile limit (8 per function, shared by every compile call
of it otherwise, even through copies of its code object) is a hard error under ``fullgraph=True``
(``FailOnRecompileLimitHit``), which one shared callable would reach after 8 shapes (buckets x batch sizes
x cache lengths). A runner keeps at most ``MAX_LLM_GRAPHS`` (the oldest is dropped); the image path is
compiled the same way.

Everything the LLM sees is a plain sequence of embeddings, so every vision-side compression method
(stage "tower" or "encoder_output") works unchanged. The image path's stages 1-2 (tower up to the
selected layer, the method's scoring, selection and merge, the projector: ``project_views``) are captured
as one graph per (compression, views shape) (``CompiledLlava.project_views``; ``fullgraph=True``, so a
graph break is an error, not a silent split). All methods in ``visionzip/methods`` capture, except where
a method builds host objects while it runs (``random`` seeds a ``torch.Generator`` per view): such an
image path runs eagerly, with one warning naming the method and dynamo's reason. The per-image layout
and the splice stay eager (host-known shapes, no host synchronisation with the prompt's host copies).
In-LLM methods (stage "llm") change the sequence inside the LLM's layers and cannot run on a static
cache yet: ``check_compilable`` refuses them with a ValueError naming the method.

Backends: on CUDA the default is inductor with ``mode="reduce-overhead"`` (CUDA graphs); on CPU inductor
with its default mode (no graphs there). ``backend="aot_eager"`` runs the same traced path without code
generation (the tests use it: inductor's C++ compile takes minutes on a small CPU).

``CompiledLlava(model).generate(input_ids, images=..., image_sizes=..., attention_mask=...)`` mirrors
``model.generate`` (returns the new tokens only, (B, T)); ``CompiledLlava.session(batch, max_cache_len)``
is the building block for multi-turn chat (``llava.serve.chat``).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch._dynamo.exc import Unsupported
from transformers import StaticCache

from llava.preflight import check_prompts_fit, model_max_positions

logger = logging.getLogger(__name__)

# Prefill lengths are padded up to one of these (then to multiples of the largest).
PREFILL_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)
# Cache lengths are rounded up to a multiple of this, so that nearby requests share graphs.
CACHE_ROUNDING = 256
MAX_KEPT_CACHES = 4
# Captured image paths kept, one per (compression, views shape, dtype, device); the oldest is dropped.
MAX_IMAGE_GRAPHS = 16
# LLM graphs kept, one per (batch, input length, cache length, dtype); the oldest is dropped.
MAX_LLM_GRAPHS = 32


def bucket_length(n: int, buckets: tuple[int, ...] = PREFILL_BUCKETS) -> int:
    """The smallest bucket >= n; past the largest, the next multiple of the largest."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a prefill needs at least 1 token, got {n!r}")
    for size in buckets:
        if n <= size:
            return size
    return math.ceil(n / buckets[-1]) * buckets[-1]


def check_compilable(model) -> None:
    """ValueError if the model's compression cannot run on the compiled path (an in-LLM method)."""
    compression = model.get_visual_compression()
    if compression.stage == "llm":
        raise ValueError(
            f"--compile cannot run the in-LLM compression method {compression.method!r} (stage 'llm'): it "
            "changes the sequence inside the LLM's layers, which a static KV cache cannot hold; run it "
            "without --compile"
        )


def default_mode(device: torch.device | str) -> str | None:
    """CUDA graphs on CUDA; inductor's default elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def _llm_forward(base_model, lm_head, embeds, slot_mask, positions, cache):
    """The LLM over ``embeds`` (B, n, hidden) written into ``cache``; logits of the last position (B, V)."""
    hidden = base_model(
        inputs_embeds=embeds, attention_mask=slot_mask, position_ids=positions, cache=cache, use_cache=True
    ).last_hidden_state
    return lm_head(hidden[:, -1])


def _project_views(model, views):
    """Stages 1-2 of the image pipeline on (V, 3, S, S) views: tower + vision-side compression + projector
    (``LlavaMetaForCausalLM.project_views``) -> ``ProjectedTokens``."""
    return model.project_views(views)


class CompiledLlava:
    """A LLaVA model's compiled LLM path (see the module docstring).

    backend: a ``torch.compile`` backend ("inductor" by default; "aot_eager" traces without code
    generation; "eager" skips compilation altogether, for debugging the static-cache logic).
    mode: ``torch.compile`` mode; "auto": "reduce-overhead" on CUDA (CUDA graphs), inductor's default on CPU.
    buckets: prefill bucket lengths (ascending).
    compile_image_path: capture the image path's stages 1-2 as one graph per (compression, views shape)
    (``project_views``); False: they run eagerly.
    Static caches are kept per (batch, cache length) for reuse, at most ``MAX_KEPT_CACHES`` (the oldest
    is dropped: a 7B model's cache of 2048 slots at batch 8 is 8.6 GB in bf16).
    """

    def __init__(self, model, backend: str = "inductor", mode: str | None = "auto",
                 buckets: tuple[int, ...] = PREFILL_BUCKETS, compile_image_path: bool = True):
        if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(buckets):
            raise ValueError(f"buckets must be ascending positive lengths, got {buckets!r}")
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.mode = default_mode(self.device) if mode == "auto" else mode
        self.backend = backend
        self.buckets = tuple(buckets)
        self._options = dict(backend=backend, dynamic=False, fullgraph=True, isolate_recompiles=True)
        if self.mode is not None:
            self._options["mode"] = self.mode
        self._llm_graphs: dict[tuple, object] = {}
        self._caches: dict[tuple[int, int], StaticCache] = {}
        self.compile_image_path = compile_image_path and backend != "eager"
        self._image_graphs: dict[tuple, object] = {}
        self._eager_image_paths: dict[object, str] = {}  # compression -> why it could not be captured

    # ----- pieces ---------------------------------------------------------------------------------
    def cache_for(self, batch: int, max_cache_len: int) -> StaticCache:
        """A static cache of (batch, max_cache_len), allocated once and reset for every new request."""
        key = (batch, max_cache_len)
        cache = self._caches.get(key)
        if cache is None:
            config = self.model.config
            heads = int(config.num_attention_heads)
            kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
            head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
            cache = StaticCache(config=config, max_cache_len=max_cache_len)
            weight = self.model.get_input_embeddings().weight
            cache.early_initialization(batch, kv_heads, head_dim, weight.dtype, self.device)
            while len(self._caches) >= MAX_KEPT_CACHES:
                self._caches.pop(next(iter(self._caches)))
            self._caches[key] = cache
        else:
            cache.reset()
        return cache

    def session(self, batch: int, max_cache_len: int) -> StaticSession:
        """A fresh static-cache session (a request, or a whole chat)."""
        check_compilable(self.model)
        if max_cache_len < 1:
            raise ValueError(f"max_cache_len must be >= 1, got {max_cache_len}")
        return StaticSession(self, batch, max_cache_len)

    @property
    def captured_image_paths(self) -> int:
        """Image-path graphs held: one per (compression, views shape, dtype, device) seen."""
        return len(self._image_graphs)

    @property
    def eager_image_paths(self) -> dict[str, str]:
        """{compression spec: dynamo's reason} for the compressions whose image path runs eagerly."""
        return {compression.spec(): reason for compression, reason in self._eager_image_paths.items()}

    def project_views(self, views: torch.Tensor):
        """``model.project_views(views)`` (views (V, 3, S, S) -> ``ProjectedTokens``), captured as one graph
        per (compression, views shape, dtype, device): the tower up to the selected layer, the method's
        scoring, selection and merge, the projector. With ``aot_eager`` the same tensors as eager (the same
        kernels, traced; the tests hold it to that bit for bit); inductor fuses kernels of its own. A method
        whose image path dynamo cannot capture whole runs eagerly (one warning naming it)."""
        model = self.model
        if not self.compile_image_path:
            return model.project_views(views)
        compression = model.get_visual_compression()
        if compression in self._eager_image_paths:
            return model.project_views(views)
        key = (compression, tuple(views.shape), views.dtype, views.device)
        graph = self._image_graphs.get(key)
        if graph is None:
            # a compile call of its own per key (isolate_recompiles): never a recompile against dynamo's limit
            graph = torch.compile(_project_views, **self._options)
            while len(self._image_graphs) >= MAX_IMAGE_GRAPHS:
                self._image_graphs.pop(next(iter(self._image_graphs)))
            self._image_graphs[key] = graph
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # its outputs are consumed by the splice before the prefill
        try:
            return graph(model, views)
        except Unsupported as error:
            reason = str(error).splitlines()[0]
            self._eager_image_paths[compression] = reason
            self._image_graphs.pop(key, None)
            logger.warning("the image path of %s cannot be captured as one graph (%s); it runs eagerly",
                           compression.spec(), reason)
            return model.project_views(views)

    @property
    def captured_llm_graphs(self) -> int:
        """LLM graphs held: one per (batch, input length, cache length, dtype) seen."""
        return len(self._llm_graphs)

    def run(self, embeds, slot_mask, positions, cache) -> torch.Tensor:
        """The LLM over ``embeds`` (B, n, hidden) into ``cache``: the graph of this (batch, n, cache length)."""
        key = (embeds.shape[0], embeds.shape[1], slot_mask.shape[1], embeds.dtype)
        fn = self._llm_graphs.get(key)
        if fn is None:
            fn = _llm_forward  # one isolated compile call per shape: see the module docstring
            if self.backend != "eager":
                fn = torch.compile(fn, **self._options)
            while len(self._llm_graphs) >= MAX_LLM_GRAPHS:
                self._llm_graphs.pop(next(iter(self._llm_graphs)))
            self._llm_graphs[key] = fn
        if self.mode == "reduce-overhead":
            # a new step for CUDA graph trees: the previous call's outputs (logits already consumed) may
            # be overwritten by this replay
            torch.compiler.cudagraph_mark_step_begin()
        return fn(self.model.get_model(), self.model.lm_head, embeds, slot_mask, positions, cache)

    # ----- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        images=None,
        image_sizes=None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        eos_token_id: int | None = "config",
        pad_token_id: int | None = None,
        stop_check_every: int = 8,
        host_input_ids: torch.Tensor | None = None,
        host_attention_mask: torch.Tensor | None = None,
        **unused,
    ) -> torch.Tensor:
        """``model.generate`` on the compiled path: the new tokens (B, T), T <= max_new_tokens; rows that
        stopped early (EOS) are filled with ``pad_token_id``. Greedy, or sampling with temperature/top_p.

        ``input_ids`` (B, L) hold ``IMAGE_TOKEN_INDEX`` where images go; batches are padded on the left
        (``attention_mask`` marks the real tokens), as ``model.generate`` does. Whether every row has
        stopped is read on the host only every ``stop_check_every`` steps. The image path and the splice
        make no host synchronisation when the prompt is known on the host: ``input_ids`` (and
        ``attention_mask``) given on the CPU (moved to the model's device here), or their CPU copies given
        as ``host_input_ids`` / ``host_attention_mask``; else the splice reads its width once
        (``LlavaMetaForCausalLM.splice_image_features``).
        """
        unused.pop("use_cache", None)
        if unused:
            raise ValueError(f"the compiled generate does not take {sorted(unused)}")
        if num_beams != 1:
            raise ValueError(f"the compiled path decodes greedily or by sampling; num_beams={num_beams} needs eager")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
        check_compilable(self.model)
        embeds, mask = self.prompt_embeddings(input_ids, images, image_sizes, attention_mask, host_input_ids,
                                              host_attention_mask)
        # the prompt-length policy of every entry point (llava.preflight.check_prompts_fit), as the eager
        # generate applies it: the spliced width is the longest prompt (capped at the cut the splice makes);
        # only a prompt at the limit is counted exactly, and a prompt that leaves no room is refused by name
        limit = model_max_positions(self.model.config)
        if limit is not None:
            positions = [embeds.shape[1]]
            if positions[0] >= limit:
                positions = self.model.prompt_positions(input_ids, images, image_sizes, attention_mask,
                                                        host_input_ids, host_attention_mask)
            max_new_tokens = check_prompts_fit(positions, max_new_tokens, limit)
        return self.generate_from_embeddings(
            embeds, mask, max_new_tokens, min_new_tokens, do_sample, temperature, top_p, eos_token_id, pad_token_id,
            stop_check_every,
        )

    @torch.no_grad()
    def generate_from_embeddings(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor | None = None,
        max_new_tokens: int = 16,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = "config",
        pad_token_id: int | None = None,
        stop_check_every: int = 8,
    ) -> torch.Tensor:
        """``generate`` from prompt embeddings already spliced: embeds (B, L, hidden), mask (B, L) of the
        real tokens, left-padded (None: no padding)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if stop_check_every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
        check_compilable(self.model)
        model = self.model
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        if eos_token_id == "config":
            eos_token_id = model.generation_config.eos_token_id
            eos_token_id = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        batch, length = embeds.shape[:2]
        cache_len = math.ceil((bucket_length(length, self.buckets) + max_new_tokens) / CACHE_ROUNDING) * CACHE_ROUNDING
        session = self.session(batch, cache_len)
        logits = session.feed(embeds, mask)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        tokens = []
        embed_tokens = model.get_input_embeddings()
        for step in range(max_new_tokens):
            if eos_token_id is not None and step < min_new_tokens:
                logits = logits.clone()  # a compiled call's output: not ours to write into
                logits[:, eos_token_id] = -float("inf")
            token = pick_token(logits, do_sample, temperature, top_p)
            token = torch.where(done, torch.full_like(token, pad), token)
            tokens.append(token)
            if eos_token_id is not None:
                done = done | (token == eos_token_id)
            if step == max_new_tokens - 1:
                break
            if eos_token_id is not None and (step + 1) % stop_check_every == 0 and bool(done.all()):
                break
            logits = session.feed(embed_tokens(token[:, None]))
        out = torch.stack(tokens, dim=1)
        if eos_token_id is not None:
            # drop trailing columns where every row had already stopped (as eager generate stops there)
            finished_before = torch.cumsum((out == eos_token_id).int(), dim=1) - (out == eos_token_id).int()
            alive = (finished_before == 0).any(dim=0)
            keep = int(alive.nonzero().max()) + 1 if bool(alive.any()) else 1
            out = out[:, :keep]
        return out

    def prompt_embeddings(self, input_ids, images, image_sizes, attention_mask, host_input_ids=None,
                          host_attention_mask=None):
        """(embeds (B, L, hidden), mask (B, L)) of the prompts, left-padded, images spliced in (the image
        path's stages 1-2 through ``project_views``, the layout and the splice eager). Prompts given on the
        CPU are their own host copies (see ``generate``)."""
        model = self.model
        if host_input_ids is None and input_ids.device.type == "cpu":
            host_input_ids = input_ids
            host_attention_mask = attention_mask if attention_mask is None else attention_mask.cpu()
        if input_ids.device != self.device:
            input_ids = input_ids.to(self.device)
            attention_mask = None if attention_mask is None else attention_mask.to(self.device)
        if images is not None and input_ids.shape[1] > 1:
            spliced = model.splice_multimodal(
                input_ids, images, image_sizes, attention_mask, padding_side="left",
                host_input_ids=host_input_ids, host_attention_mask=host_attention_mask,
                project_views=self.project_views,
            )
            embeds, mask = spliced.inputs_embeds, spliced.attention_mask
        else:
            embeds, mask = model.get_input_embeddings()(input_ids), attention_mask
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask


def pick_token(logits: torch.Tensor, do_sample: bool, temperature: float | None, top_p: float | None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax, or a sample at ``temperature`` within ``top_p``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature is None or temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature!r}")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1)[:, 0]


@dataclass
class StaticSession:
    """One batch's static KV cache with its slot mask and per-sample positions (see the module docstring).

    ``feed(embeds, mask)`` reads n new positions into the cache and returns the last position's logits;
    one-token feeds run the decode graph, longer ones are left-padded to a bucket and run the prefill
    graph. ``get_seq_length()`` counts the positions fed without the bucket padding (what a
    ``DynamicCache`` fed the same inputs would hold).
    """

    runner: CompiledLlava
    batch: int
    max_cache_len: int
    slots_used: int = 0
    real_tokens: int = 0
    cache: StaticCache = field(init=False)
    slot_mask: torch.Tensor = field(init=False)
    next_position: torch.Tensor = field(init=False)

    def __post_init__(self):
        device = self.runner.device
        self.cache = self.runner.cache_for(self.batch, self.max_cache_len)
        self.slot_mask = torch.zeros(self.batch, self.max_cache_len, dtype=torch.long, device=device)
        self.next_position = torch.zeros(self.batch, 1, dtype=torch.long, device=device)

    def get_seq_length(self) -> int:
        return self.real_tokens

    def feed(self, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, n, hidden), mask (B, n) of real tokens (None: all real) -> logits (B, V)."""
        batch, n = embeds.shape[:2]
        if batch != self.batch:
            raise ValueError(f"this session holds a batch of {self.batch}, got {batch} sequences")
        width = 1 if n == 1 else bucket_length(n, self.runner.buckets)
        if self.slots_used + width > self.max_cache_len >= self.slots_used + n:
            width = n  # the bucket no longer fits but the tokens do: an exact-length graph (one recompile)
        if self.slots_used + width > self.max_cache_len:
            raise ValueError(
                f"the static cache holds {self.max_cache_len} slots: {self.slots_used} are used and this input "
                f"needs {width} more ({n} tokens padded to a bucket)"
            )
        if mask is None:
            mask = torch.ones(batch, n, dtype=torch.long, device=embeds.device)
        mask = mask.to(device=embeds.device, dtype=torch.long)
        if width > n:
            embeds = torch.cat([embeds.new_zeros(batch, width - n, embeds.shape[2]), embeds], dim=1)
            mask = torch.cat([mask.new_zeros(batch, width - n), mask], dim=1)
        # the graphs guard on strides, even of size-1 dims: a slice of a longer sequence (which .contiguous()
        # leaves as it is) would recompile towards dynamo's limit; give every input the standard strides
        if embeds.stride() != (width * embeds.shape[2], embeds.shape[2], 1):
            embeds = embeds.clone(memory_format=torch.contiguous_format)
        positions = self.next_position + (mask.cumsum(dim=1) - 1).clamp(min=0)
        self.slot_mask[:, self.slots_used : self.slots_used + width] = mask
        logits = self.runner.run(embeds, self.slot_mask, positions, self.cache)
        self.next_position = self.next_position + mask.sum(dim=1, keepdim=True)
        self.slots_used += width
        self.real_tokens += n  # positions fed, bucket padding excluded (a host count: no device read)
        return logits


# ----- the command-line switch -------------------------------------------------------------------
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_HELP = (
    "compiled inference path: static KV cache + torch.compile (CUDA graphs on CUDA, inductor on CPU), "
    "bucketed prefill lengths; off by default (not yet proven on a GPU); in-LLM methods are refused. "
    "An optional backend: inductor (default), aot_eager (the same trace without code generation: quick "
    "on a CPU), eager (the static-cache logic uncompiled)"
)


def add_compile_argument(parser) -> None:
    """``--compile [BACKEND]`` (the one switch of every generation entry point): absent -> None (eager),
    ``--compile`` -> "inductor", ``--compile aot_eager`` -> that backend."""
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, choices=COMPILE_BACKENDS,
                        metavar="BACKEND", help=COMPILE_HELP)


def compile_backend(compile) -> str | None:
    """The backend a ``--compile`` value asks for (None: eager generation). ``True`` means inductor."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if compile not in COMPILE_BACKENDS:
        raise ValueError(f"unknown compile backend {compile!r}; choose one of {COMPILE_BACKENDS}")
    return compile


def compiled_runner(model, compile) -> CompiledLlava | None:
    """A ``CompiledLlava`` for ``--compile`` (None without it); an in-LLM compression is refused first."""
    backend = compile_backend(compile)
    if backend is None:
        return None
    check_compilable(model)
    return CompiledLlava(model, backend=backend)


def generate_function(model, compile):
    """``model.generate``, or the compiled path's ``generate`` (same arguments, same output: new tokens)
    when ``compile`` (True, or a backend name: ``compile_backend``); an in-LLM compression is refused
    before anything runs."""
    runner = compiled_runner(model, compile)
    return model.generate if runner is None else runner.generate
