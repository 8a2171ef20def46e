"""What a compression method is: its settings dataclass, the tokens it returns, the registry.

A method is one module in ``visionzip/methods/`` holding one ``CompressionMethod`` subclass, registered with
``@register_method``. That class owns everything about the method:

- its settings (dataclass fields) and their validation (``validate``);
- its spec on the command line: ``METHOD:TOKENS`` (``from_budget``: the paper's split of a token budget
  per image, or per crop on LLaVA-NeXT), ``METHOD:key=value,...`` (the canonical form ``spec`` prints)
  and, where the released code had one, its positional form as an input alias (``positional``, e.g.
  ``visionzip:54,10``);
- where it acts (``stage``): ``"tower"`` (inside the vision tower's layers), ``"encoder_output"``
  (between the tower's selected layer and the projector) or ``"llm"`` (inside the language model);
- how many visual tokens one view ends up with (``tokens_per_view``);
- the budget limits against an encoder or an LLM, checked before anything runs (``check``,
  ``check_llm``), each a ValueError naming the value and the limit;
- the work itself: ``encode`` for vision-side methods, ``llm_pruner`` for in-LLM methods;
- its share of the analytic FLOPs (``llm_token_schedule``);
- its reference re-enactment of the official code (``reference``, a dotted path, documented in the module).

Nothing outside ``visionzip/methods/`` branches on a method's name: model code asks the settings object.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..encoders import EncoderCapture, VisionEncoderAdapter

if TYPE_CHECKING:  # pragma: no cover
    from ..llm import LLMTokenPruner

STAGES = ("tower", "encoder_output", "llm")


def check_count(name: str, value, minimum: int = 1) -> int:
    """Validate an integer setting: a clear ValueError naming the value and the limit."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_ratio(name: str, value, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value}")
    return float(value)


@dataclass
class CompressedTokens:
    """Visual tokens that survive compression, in the encoder's feature space (pre-projector) as a
    method returns them; ``llava`` hands the projected tokens on in ``ProjectedTokens`` instead.

    tokens: (B, T, C). Its first ``num_kept`` tokens are encoder tokens kept as they are, at the
        sequence positions ``keep_indices`` (B, num_kept), ascending (CLS = 0 first when kept); any
        tokens after them are merged (VisionZip's contextual tokens, PruMerge's extra token).
    has_cls: whether position 0 of the encoder sequence is a CLS token (patch p sits at p + has_cls).
    cls_kept: whether the CLS token is among the kept tokens (VisionZip keeps it, VisPruner does not).
    merged_indices: (B, num_merged) an encoder position standing for each merged token (VisionZip: its
        contextual target's), or None where a merged token has no single position (pooling). Models that
        give each visual token its own position (Qwen2.5-VL's M-RoPE) place merged tokens there.
    """

    tokens: torch.Tensor
    keep_indices: torch.Tensor
    has_cls: bool
    cls_kept: bool
    merged_indices: torch.Tensor | None = None

    @property
    def num_kept(self) -> int:
        return self.keep_indices.shape[1]

    @property
    def num_merged(self) -> int:
        return self.tokens.shape[1] - self.num_kept


def _convert(field: dataclasses.Field, text: str):
    """A command-line value for a settings field, by the field's declared type."""
    kind = str(field.type)
    text = text.strip()
    if "bool" in kind:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{field.name}={text!r} is not a boolean (true/false)")
    if "int" in kind and "float" not in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    if "tuple" in kind or "list" in kind:
        return tuple(float(x) if "." in x else int(x) for x in text.split("/") if x)
    return text


@dataclass
class CompressionMethod:
    """Base of every method's settings. Subclasses are dataclasses and set the class attributes."""

    name: ClassVar[str] = ""
    display_name: ClassVar[str] = ""  # for tables and plots (default: the name)
    stage: ClassVar[str] = "encoder_output"
    summary: ClassVar[str] = ""
    # field names filled by a positional spec with two or more values: an input alias for the command lines
    # of the released code (VisionZip's "visionzip:54,10"); spec() always prints key=value
    positional: ClassVar[tuple[str, ...]] = ()
    # dotted path of the function that re-enacts the official code (tests hold the fast path to it)
    reference: ClassVar[str] = ""
    # whether the tower must capture the scored layer's attention input (for q / k)
    needs_attention_input: ClassVar[bool] = True

    def __post_init__(self):
        self.validate()

    # ----- settings -----------------------------------------------------------------------------
    def validate(self) -> CompressionMethod:
        """Check the settings' own types and ranges (ValueError naming the value and the limit)."""
        return self

    @classmethod
    def from_budget(cls, tokens: int) -> CompressionMethod:
        """The method's paper settings for ``tokens`` visual tokens per view (image, or crop on NeXT)."""
        raise ValueError(f"{cls.name} has no budget rule; give its settings as {cls.name}:key=value,...")

    @classmethod
    def from_args(cls, args: str) -> CompressionMethod:
        """Parse what follows ``METHOD:`` in a spec: ``TOKENS``, ``key=value,...`` or the positional form."""
        parts = [p.strip() for p in args.split(",") if p.strip()]
        known = {f.name: f for f in dataclasses.fields(cls)}
        usage = (
            f"cannot parse compression spec '{cls.name}:{args}': use '{cls.name}:TOKENS' (visual tokens per "
            f"image, per crop on LLaVA-NeXT) or '{cls.name}:key=value,...' with keys {sorted(known)}"
        )
        if not parts:
            raise ValueError(usage)
        try:
            if all("=" in p for p in parts):
                values = {}
                for part in parts:
                    key, _, value = part.partition("=")
                    key = key.strip()
                    if key not in known:
                        raise ValueError(f"unknown setting {key!r} for {cls.name}; known: {sorted(known)}")
                    if key in values:  # the last value silently winning would run another budget than meant
                        raise ValueError(f"compression spec '{cls.name}:{args}' gives {key!r} twice")
                    values[key] = _convert(known[key], value)
                return cls(**values)
            if any("=" in p for p in parts):
                raise ValueError(usage)
            if len(parts) == 1:
                return cls.from_budget(int(parts[0]))
            if len(parts) <= len(cls.positional):
                return cls(**{key: _convert(known[key], value) for key, value in zip(cls.positional, parts)})
        except ValueError as err:
            if "invalid literal" in str(err) or "could not convert" in str(err):
                raise ValueError(usage) from err
            raise
        raise ValueError(usage)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The ``--compression`` string that gives back these settings, in the one canonical form
        ``METHOD:key=value,...`` (every setting named; a positional form is accepted as input only)."""
        items = []
        for key, value in self.to_dict().items():
            if isinstance(value, (tuple, list)):
                value = "/".join(str(v) for v in value)
            elif isinstance(value, float):
                value = f"{value:g}"
            items.append(f"{key}={value}")
        return f"{self.name}:{','.join(items)}"

    def label(self) -> str:
        """A short human-readable label for tables (e.g. ``visionzip 54+10``)."""
        return f"{self.name} {self.tokens_per_view()}"

    # ----- what it produces ---------------------------------------------------------------------
    def tokens_per_view(self, num_tokens: int | None = None) -> int | None:
        """Visual tokens one view (an image, or one anyres crop) contributes to the LLM's input after
        the method has acted (for in-LLM methods: at the end of the pruning schedule). ``num_tokens``:
        the view's uncompressed count, for methods whose output depends on it."""
        raise NotImplementedError

    def llm_input_tokens_per_view(self, num_tokens: int) -> int:
        """Visual tokens per view spliced into the LLM's input (in-LLM methods prune later)."""
        return num_tokens if self.stage == "llm" else self.tokens_per_view(num_tokens)

    # ----- checks -------------------------------------------------------------------------------
    def check(self, adapter: VisionEncoderAdapter, select_layer: int) -> None:
        """Budget limits against an encoder (vision-side methods)."""

    def check_llm(self, num_layers: int) -> None:
        """Budget limits against an LLM of ``num_layers`` decoder layers (in-LLM methods)."""

    def check_view(self, num_tokens: int) -> None:
        """Budget limits against the ``num_tokens`` visual tokens one view puts into the LLM (in-LLM
        methods; vision-side methods check against the encoder in ``check``)."""

    def check_training(self) -> None:
        """A ValueError when these settings cannot be trained with (checked before a training run loads its
        model): e.g. a token count that depends on the image, which one training batch cannot hold."""

    # ----- the work -----------------------------------------------------------------------------
    def compress(self, adapter: VisionEncoderAdapter, capture: EncoderCapture) -> CompressedTokens:
        """Encoder-output methods: compress an encoder pass captured by ``adapter.run``."""
        raise NotImplementedError(f"{self.name} does not act on the encoder output (stage {self.stage!r})")

    def encode(
        self,
        adapter: VisionEncoderAdapter,
        pixel_values: torch.Tensor,
        select_layer: int = -2,
        early_exit: bool = True,
    ) -> CompressedTokens:
        """Vision-side methods: run the tower on ``pixel_values`` (B, 3, H, W) and compress. Tower-stage
        methods override this; encoder-output methods capture the selected layer and ``compress``."""
        capture = adapter.run(
            pixel_values, select_layer, capture_attn_input=self.needs_attention_input, early_exit=early_exit
        )
        return self.compress(adapter, capture)

    def llm_pruner(self, num_layers: int, view_tokens: int | None = None) -> LLMTokenPruner:
        """In-LLM methods: the pruning schedule and selection the LLM's forward applies (``visionzip.llm``).
        ``view_tokens``: the tower's tokens per view, for budgets given per view."""
        raise NotImplementedError(f"{self.name} does not act inside the LLM (stage {self.stage!r})")

    # ----- the official code path, re-enacted ----------------------------------------------------
    def reference_tokens(self, vision_model, pixel_values: torch.Tensor, select_layer: int = -2) -> torch.Tensor:
        """The official code path re-enacted on a HF vision model (eager, as the official code runs it):
        the (B, T, C) tokens it hands to the projector. Tests hold ``encode`` to it; the bench times it."""
        raise NotImplementedError(f"{self.name} has no vision-side reference re-enactment")

    def reference_merge_shape(self, num_tokens: int) -> tuple[int, int] | None:
        """The last two dims of a dense merge operand the official code builds (the bench's audit counts
        such matrix products), or None."""
        return None

    # ----- analytic cost --------------------------------------------------------------------------
    def llm_token_schedule(self, num_layers: int, visual_tokens: int, view_tokens: int | None = None) -> list[int]:
        """Visual tokens each of the ``num_layers`` LLM layers processes, for ``visual_tokens`` spliced
        in (FastV's FLOPs formula sums over this; ``view_tokens``: the tower's tokens per view, for
        in-LLM budgets given per view). Vision-side methods: constant."""
        return [visual_tokens] * num_layers


_REGISTRY: dict[str, type[CompressionMethod]] = {}


def register_method(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: add a ``CompressionMethod`` subclass to the registry under ``cls.name``."""
    if not cls.name or cls.name in ("none", "vanilla"):
        raise ValueError(f"a method needs a name other than 'none'/'vanilla', got {cls.name!r}")
    if cls.stage not in STAGES:
        raise ValueError(f"{cls.name}: stage must be one of {STAGES}, got {cls.stage!r}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (tests that register their own clean up with this)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> type[CompressionMethod]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compression method {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    return sorted(_REGISTRY)


# ----- index helpers shared by the methods ------------------------------------------------------
def complement_indices(keep: torch.Tensor, length: int) -> torch.Tensor:
    """Positions of 0..length-1 not in ``keep``, ascending, without a host sync.

    keep: (B, K) distinct positions -> (B, length - K).
    """
    mask = torch.zeros(keep.shape[0], length, dtype=torch.uint8, device=keep.device)
    mask.scatter_(1, keep, 1)
    # a stable sort puts the unkept (0) positions first, in ascending order
    order = torch.sort(mask, dim=1, stable=True).indices
    return order[:, : length - keep.shape[1]]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, N, C), index: (B, K) -> (B, K, C)."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
