"""Issue 22, item 7: SparseVLM on a batch that mixes text-only and image samples. A sample without visual
tokens is left alone (no raters, nothing pruned): each row answers as it does alone, in ``generate`` and
in training (a text-only sample then carries the collator's zero-length dummy image), where the official
code's batch-0-only reading used to end in an ``IndexError`` after step 1."""
from __future__ import annotations

import pytest
from PIL import Image

from llava.model.tiny import build_tiny_llava
from llava.train.synthetic import write_synthetic_dataset
from llava.train.train import parse_arguments, train

SPEC = "sparsevlm:layers=0,counts=32"  # the tiny LLM has 2 layers: one sparse layer after layer 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llava(str(tmp_path_factory.mktemp("tiny") / "tiny15"))


def test_generate_on_a_mixed_batch_answers_each_row_as_alone(tiny):
    from llava.model.builder import load_pretrained_model
    from llava.processor import LlavaProcessor

    tokenizer, model, image_processor, _ = load_pretrained_model(tiny, None, device="cpu", compression=SPEC)
    processor = LlavaProcessor.from_model(model, tokenizer, image_processor, "vicuna_v1")
    image = Image.new("RGB", (40, 30), (0, 90, 200))

    def generate(questions, images):
        inputs = processor(questions, images)
        return model.generate(**inputs.generate_kwargs(), max_new_tokens=3, pad_token_id=processor.pad_token_id)

    both = generate(["What is it?", "Say hi."], [[image], []])
    assert both.tolist() == generate(["What is it?"], [[image]]).tolist() + generate(["Say hi."], None).tolist()


def test_two_training_steps_on_mixed_batches(tiny, tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(str(data), num_image=1, num_text=1, multi_turn=False)  # every batch of 2 mixes
    result = train(*parse_arguments([
        "--model_name_or_path", tiny, "--data_path", str(data / "data.json"), "--image_folder", str(data / "images"),
        "--compression", SPEC, "--image_aspect_ratio", "pad", "--tune_mm_mlp_adapter", "True",
        "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--learning_rate", "1e-3", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True",
        "--disable_tqdm", "True", "--logging_steps", "1",
    ]))
    assert result.global_step == 2 and len(result.losses) == 2 and result.skipped_samples == 0
