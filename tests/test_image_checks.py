"""Issue 22, item 8: image geometries the preprocessing cannot handle are refused before any buffer is
made (``llava.mm_utils.check_image_geometry``), with the size, the mode and the limit named: a 377-byte
100000 x 1 PNG passes PIL's decompression-bomb check but would ask "pad" for a 30 GB canvas (training
died with MemoryError after step 1). Checked from the file's header in ``load_image`` (run_llava, the
chat CLI, the training data check and dataset), and per mode in ``process_images``."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from llava.mm_utils import (
    MAX_WORKING_PIXELS,
    ImageLoadError,
    check_image_geometry,
    load_image,
    process_images,
)

THIN = (100000, 1)


@pytest.fixture(scope="module")
def thin_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "thin.png"
    Image.new("L", THIN, 0).save(path, optimize=True)
    return path


def config(aspect):
    return type("Config", (), {"image_aspect_ratio": aspect, "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]]})


def test_the_thin_png_is_refused_from_its_header(thin_png):
    assert os.path.getsize(thin_png) < 1000 and THIN[0] * THIN[1] < Image.MAX_IMAGE_PIXELS  # PIL lets it pass
    with pytest.raises(ImageLoadError, match=r"thin.png: a 100000 x 1 image \(aspect ratio 100000:1\) needs a "
                                             r"100000 x 100000 padded canvas .* over the limit of 357,913,940"):
        load_image(str(thin_png))


@pytest.mark.parametrize("aspect, refused", [("pad", True), (None, True), ("anyres", False)])
def test_each_mode_checks_what_it_allocates(aspect, refused):
    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    image = Image.new("RGB", THIN, (0, 0, 0))
    if refused:  # before the canvas (pad) or the 336 x 33.6 M resize (the processor's own) is allocated
        with pytest.raises(ImageLoadError, match=r"a 100000 x 1 image .*(padded canvas|resize \(shortest edge to 336\))"):
            process_images([image], processor, config(aspect))
    else:  # anyres: crops of a grid pinpoint and a square base view, whatever the input's shape
        assert process_images([image], processor, config(aspect)).shape[-2:] == (336, 336)


def test_ordinary_and_merely_wide_images_pass():
    for size in [(640, 480), (4000, 100), (13000, 9000)]:
        for aspect in (None, "pad", "square", "anyres"):
            check_image_geometry(size, aspect)
    with pytest.raises(ImageLoadError, match=r"a 20000 x 100 image .* 20000 x 20000 padded canvas"):
        check_image_geometry((20000, 100), "pad")
    check_image_geometry((20000, 100), "anyres")
    assert MAX_WORKING_PIXELS == 4 * 89_478_485


def test_training_refuses_it_before_loading_and_skips_it_when_read(thin_png, tmp_path):
    from llava.model.tiny import TOWER_DIR, build_tiny_llava
    from llava.model.tokenizer import load_tokenizer
    from llava.processor import LlavaProcessor
    from llava.train.dataset import DataFileError, LazySupervisedDataset, check_data_file
    from llava.train.synthetic import write_synthetic_dataset

    folder = tmp_path / "data"
    write_synthetic_dataset(str(folder), num_image=2, num_text=0, multi_turn=False, image_size=(64, 48))
    records = json.loads((folder / "data.json").read_text())
    (folder / "images" / records[1]["image"].split("/")[-1]).write_bytes(thin_png.read_bytes())
    with pytest.raises(DataFileError, match=r"sample 1.*100000 x 1 image"):  # the pre-flight decode check
        check_data_file(str(folder / "data.json"), image_folder=str(folder / "images"), check_image_decode="yes")

    tiny = build_tiny_llava(str(tmp_path / "tiny15"))
    processor = LlavaProcessor.for_training(
        load_tokenizer(tiny), CLIPImageProcessorPil.from_pretrained(os.path.join(tiny, TOWER_DIR)), "v1",
        image_aspect_ratio="pad",
    )
    dataset = LazySupervisedDataset(
        str(folder / "data.json"), processor, image_folder=str(folder / "images"), model_max_length=512,
        visual_tokens_per_image=64, check_image_decode="no", bad_sample_policy="skip",
    )
    example = dataset[1]  # read during training: skipped and counted, not a MemoryError
    assert len(example["skipped_samples"]) == 1 and "100000 x 1 image" in example["skipped_samples"][0]
