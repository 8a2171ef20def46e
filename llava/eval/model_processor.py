"""The processor a front-end builds a loaded model's inputs with: one rule for run_llava, the eval engine
(``llava.eval.generate``), the chat CLI (``llava.serve.cli``) and the lmms-eval plugin.

- A model that builds its own inputs, ``model.build_processor(tokenizer, image_processor, conv_mode)`` (the
  natively implemented families of ``llava.model.builder.NATIVE_FAMILIES``: their own prompt formats and
  pixels, e.g. CogVLM's "Question: ... Answer:"), gets its own processor. It returns ``llava.processor.LlavaInputs``
  and has ``LlavaProcessor``'s interface (``__call__(questions, images)``, ``build_prompt``, ``pad_token_id``),
  so the front-ends hand its inputs to ``model.generate`` as they do LLaVA's.
- Every other model (LLaVA and its forks) gets ``llava.processor.LlavaProcessor`` with a conversation
  template of ``llava.conversation.conv_templates``.

The template when none is given: the model's ``default_conv_mode`` where it names one (Qwen-VL: its
checkpoint's chat format), else the LLaVA default for a LLaVA model (``llava.model.builder.default_conv_mode``),
else None: the family's processor uses its checkpoint's own format (CogVLM: ``config.template_version``).
Nothing here branches on a family's name.
"""
from __future__ import annotations


def builds_own_inputs(model) -> bool:
    """Whether ``model`` builds its own inputs (``build_processor``) instead of LLaVA's processor."""
    return callable(getattr(model, "build_processor", None))


def resolve_conv_mode(model, conv_mode: str | None = None) -> str | None:
    """The template a front-end runs ``model`` with (see the module docstring)."""
    if conv_mode:
        return conv_mode
    named = getattr(model, "default_conv_mode", None)
    if isinstance(named, str) and named:
        return named
    if builds_own_inputs(model):
        return None
    from llava.model.builder import default_conv_mode

    return default_conv_mode(model)


def check_llava_conv_mode(conv_mode: str, what: str = "--conv-mode") -> None:
    """A ValueError naming ``conv_mode`` and the known templates when LLaVA has no such template."""
    from llava.conversation import conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"unknown {what} {conv_mode!r}; known: {sorted(conv_templates)}")


def processor_for(model, tokenizer, image_processor, conv_mode: str | None = None, what: str = "--conv-mode"):
    """-> (processor, the template it runs: ``resolve_conv_mode``). A LLaVA model with an unknown template is
    refused naming it; a family's own processor validates (or ignores) the template itself."""
    conv_mode = resolve_conv_mode(model, conv_mode)
    if builds_own_inputs(model):
        return model.build_processor(tokenizer, image_processor, conv_mode), conv_mode
    from llava.processor import LlavaProcessor

    check_llava_conv_mode(conv_mode, what)
    return LlavaProcessor.from_model(model, tokenizer, image_processor, conv_mode), conv_mode


def refuse_llava_only_option(model, option: str, why: str) -> None:
    """A ValueError when ``option`` (a LLaVA-stack feature) is asked of a model that builds its own inputs."""
    if builds_own_inputs(model):
        raise ValueError(
            f"{option} {why}; {type(model).__name__} builds its own inputs (build_processor) and decodes with its "
            f"own generate: run it without {option}"
        )
