"""Training's loss through ``LlavaLlamaForCausalLM._supervised_forward`` (lm_head and the cross-entropy at
the supervised positions only) equals transformers' full-logits loss, and so do the gradients: with and
without the Trainer's ``num_items_in_batch``, on a batch with right padding, an image row and a text-only
row (which carries the collator's dummy image), and with an in-LLM method (its own pruned path)."""
from __future__ import annotations

import pytest
import torch

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.tiny import build_tiny_llava


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from llava.model.builder import load_pretrained_model

    path = build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "tiny15"))
    _, model, _, _ = load_pretrained_model(path, None, device="cpu")
    return model.float()


def batch(vocab: int):
    """Three rows, right-padded: two with an image, one text-only; labels only on each row's answer."""
    generator = torch.Generator().manual_seed(0)
    lengths, answers, with_image = [12, 9, 7], [3, 2, 4], [True, True, False]
    width = max(lengths)
    input_ids = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), IGNORE_INDEX)
    attention_mask = torch.zeros(3, width, dtype=torch.bool)
    for row, (length, answer, image) in enumerate(zip(lengths, answers, with_image)):
        input_ids[row, :length] = torch.randint(3, vocab, (length,), generator=generator)
        if image:
            input_ids[row, 2] = IMAGE_TOKEN_INDEX
        labels[row, length - answer:length] = input_ids[row, length - answer:length]
        attention_mask[row, :length] = True
    images = torch.randn(3, 3, 336, 336, generator=generator)
    images[2] = 0  # the collator's dummy image of a text-only sample
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "images": images}


def loss_and_grads(model, inputs, training: bool, **kwargs):
    model.zero_grad(set_to_none=True)
    model.train(training)
    out = model(**inputs, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return out, grads


@pytest.mark.parametrize("num_items", [None, 9, 5.0])
@pytest.mark.parametrize("spec", [None, "fastv:layer=1,tokens=32"])
def test_supervised_loss_and_gradients_equal_the_full_logits_path(model, num_items, spec):
    model.set_visual_compression(spec)
    try:
        inputs = batch(model.config.vocab_size)
        kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
        # the model has no dropout: train and eval modes compute the same function; eval takes the full path
        full, full_grads = loss_and_grads(model, inputs, False, **kwargs)
        cut, cut_grads = loss_and_grads(model, inputs, True, **kwargs)
    finally:
        model.set_visual_compression(None)
    assert model.config.attention_dropout == 0
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    supervised = int((shifted != IGNORE_INDEX).sum())
    assert supervised == 9  # every answer token, scored at the position before it
    if spec is None:
        assert full.logits.dim() == 3 and cut.logits.shape == (supervised, model.config.vocab_size)
    torch.testing.assert_close(cut.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert cut_grads.keys() == full_grads.keys() and "lm_head.weight" in cut_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(cut_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    if num_items is not None:
        # sum / num_items_in_batch, not a mean: the two losses differ by supervised / num_items (the Trainer then
        # does not divide by the accumulation steps); the in-LLM methods' pruned path too
        model.set_visual_compression(spec)
        try:
            mean, _ = loss_and_grads(model, inputs, True)
        finally:
            model.set_visual_compression(None)
        torch.testing.assert_close(cut.loss * num_items / supervised, mean.loss, rtol=1e-6, atol=1e-7)


def test_eval_mode_and_no_labels_keep_every_positions_logits(model):
    inputs = batch(model.config.vocab_size)
    model.train()
    try:
        without_labels = model(**{k: v for k, v in inputs.items() if k != "labels"})
    finally:
        model.eval()
    with torch.no_grad():
        with_labels = model(**inputs)
    assert without_labels.loss is None and with_labels.loss is not None
    assert without_labels.logits.shape == with_labels.logits.shape
    assert with_labels.logits.shape[:2] == (3, with_labels.logits.shape[1]) and with_labels.logits.shape[1] > 12


def test_only_a_right_padded_batch_numbered_from_zero_drops_its_mask():
    from llava.model.language_model.llava_llama import right_padded_from_zero

    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    counting = torch.arange(4).expand(2, 4)
    assert right_padded_from_zero(right, None) and right_padded_from_zero(right, counting)
    assert right_padded_from_zero(right, counting.masked_fill(right == 0, 0))  # a pad's position is free
    assert not right_padded_from_zero(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), None)  # left padding
    assert not right_padded_from_zero(torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]), None)  # a hole
    assert not right_padded_from_zero(right, counting + 1)  # not numbered from zero
    assert not right_padded_from_zero(None, counting)
