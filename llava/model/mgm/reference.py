"""A re-enactment of Mini-Gemini's official forward, op for op, on the weights of our ``MGMLlamaForCausalLM``:
what ``tests/test_family_mgm.py`` holds the model to (vanilla logits within 1e-4 in float32).

Official code: dvlab-research/MGM at 769820cb71afc7c2b9a2166ca3ce92db1636215c

- ``mgm/eval/model_vqa_loader.py`` (``CustomDataset.__getitem__``): the HR tensor is the processor's output at
  ``image_size_aux``; the LR tensor is its ``F.interpolate(..., size=[336, 336], mode='bilinear',
  align_corners=False)`` (``official_lr_from_hr``);
- ``mgm/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.image_forward`` / ``feature_select``): HF
  CLIP with ``output_hidden_states=True``, ``hidden_states[mm_vision_select_layer][:, 1:]``;
- ``mgm/model/multimodal_encoder/openclip_encoder.py`` (``OpenCLIPVisionTower.basic_forward`` / ``backbone``):
  the ConvNeXt stem and stages (timm's ``ConvNeXt`` forward, huggingface/pytorch-image-models at aa4b585,
  ``timm/models/convnext.py``, re-enacted functionally in ``official_convnext_stages`` in eval mode: see
  ``llava.model.mgm.convnext`` on the official's DropPath), stages 1-3 upsampled to stage 0 and concatenated;
- ``mgm/model/mgm_arch.py`` (``MGMMetaForCausalLM.encode_images`` with ``image_grid`` 1, ``unified_resampler``,
  ``prepare_inputs_labels_for_multimodal``);
- ``mgm/model/language_model/mgm_llama.py`` (``MGMLlamaForCausalLM.forward``): ``LlamaModel`` on the spliced
  ``inputs_embeds``, ``lm_head``, ``logits.float()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaModel

from llava.constants import IMAGE_TOKEN_INDEX


def official_lr_from_hr(images_aux: torch.Tensor, raw_size: int = 336) -> torch.Tensor:
    """The LR tensors of a batch of HR tensors, one by one as the loader makes them."""
    return torch.stack([
        F.interpolate(image[None], size=[raw_size, raw_size], mode="bilinear", align_corners=False)[0]
        for image in images_aux
    ])


def official_convnext_stages(params: dict[str, torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
    """timm's ConvNeXt stem and stages, eval mode, on the aux tower's parameters (keys ``vision_stem.*``,
    ``vision_stages.*``): the output of each stage, (B, C_i, H_i, W_i)."""

    def layer_norm_2d(x, prefix):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), params[prefix + ".weight"], params[prefix + ".bias"], 1e-6)
        return x.permute(0, 3, 1, 2)

    stem = params["vision_stem.0.weight"]
    x = F.conv2d(images, stem, params["vision_stem.0.bias"], stride=stem.shape[-1])
    x = layer_norm_2d(x, "vision_stem.1")
    results = []
    stage = 0
    while f"vision_stages.{stage}.blocks.0.conv_dw.weight" in params:
        prefix = f"vision_stages.{stage}"
        if prefix + ".downsample.1.weight" in params:
            x = layer_norm_2d(x, prefix + ".downsample.0")
            x = F.conv2d(x, params[prefix + ".downsample.1.weight"], params[prefix + ".downsample.1.bias"], stride=2)
        block = 0
        while f"{prefix}.blocks.{block}.conv_dw.weight" in params:
            b = f"{prefix}.blocks.{block}"
            shortcut = x
            dw = params[b + ".conv_dw.weight"]
            x = F.conv2d(x, dw, params[b + ".conv_dw.bias"], padding=(dw.shape[-1] - 1) // 2,  # timm get_padding
                         groups=dw.shape[0])
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, (x.shape[-1],), params[b + ".norm.weight"], params[b + ".norm.bias"], 1e-6)
            x = F.linear(x, params[b + ".mlp.fc1.weight"], params[b + ".mlp.fc1.bias"])
            x = F.gelu(x)
            x = F.linear(x, params[b + ".mlp.fc2.weight"], params[b + ".mlp.fc2.bias"])
            x = x.permute(0, 3, 1, 2)
            if b + ".gamma" in params:
                x = x.mul(params[b + ".gamma"].reshape(1, -1, 1, 1))
            x = x + shortcut
            block += 1
        results.append(x)
        stage += 1
    return results


def official_backbone(vision_tower_aux, images: torch.Tensor) -> torch.Tensor:
    """``OpenCLIPVisionTower.backbone``: (B, 3, S, S) -> (B, sum C_i, S/4, S/4)."""
    params = dict(vision_tower_aux.named_parameters())
    images = images.to(device=vision_tower_aux.device, dtype=vision_tower_aux.dtype)
    with torch.no_grad():
        results = {f"stage_{i}": r for i, r in enumerate(official_convnext_stages(params, images))}
    target_size = (results["stage_0"].shape[-2], results["stage_0"].shape[-1])
    result_cat = []
    for _stage in results:
        if _stage == "stage_0":
            result_cat.append(results[_stage].contiguous())
        else:
            result_cat.append(F.interpolate(results[_stage].float().contiguous(), size=target_size, mode="bilinear",
                                            align_corners=False).to(dtype=results[_stage].dtype))
    return torch.cat(result_cat, dim=1).contiguous()


def official_clip_features(vision_tower, images: torch.Tensor) -> torch.Tensor:
    """``CLIPVisionTower.forward``: ``hidden_states[select_layer][:, 1:]`` of HF CLIP (our tower's model)."""
    with torch.no_grad():
        out = vision_tower.vision_tower(images.to(device=vision_tower.device, dtype=vision_tower.dtype),
                                        output_hidden_states=True)
    return out.hidden_states[vision_tower.select_layer][:, 1:].to(images.dtype)


def official_unified_resampler(model, images: torch.Tensor, images_aux: torch.Tensor):
    """``MGMMetaForCausalLM.unified_resampler``, verbatim in its ops."""
    base = model.get_model()
    patch_num = int(images.shape[1] ** 0.5)
    patch_size = images_aux.shape[-1] // patch_num
    images_aux = images_aux.permute(0, 2, 3, 1)
    images_aux = images_aux.reshape(len(images_aux), patch_num, patch_size, patch_num, patch_size, images_aux.shape[-1])
    images_aux = images_aux.permute(0, 1, 3, 2, 4, 5)
    images_aux = images_aux.reshape(len(images_aux), patch_num**2, patch_size**2, images_aux.shape[-1]).contiguous()
    embed_query = base.vlm_uni_query_projector(images)
    embed_aux = base.vlm_uni_aux_projector(images_aux)
    embed_value = base.vlm_uni_val_projector(images_aux)
    embed_att = embed_query[:, :, None] @ (embed_aux.transpose(-1, -2) / (embed_aux.shape[-1] ** 0.5))
    embed_att = embed_att.nan_to_num()
    embed_feat = (embed_att.softmax(-1) @ embed_value).mean(2)
    return images, embed_feat


def official_encode_images(model, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
    """``MGMMetaForCausalLM.encode_images`` (``image_grid`` 1, no global view): (B, 576, hidden)."""
    base = model.get_model()
    image_features = official_clip_features(base.get_vision_tower(), images)
    image_aux_features_raw = official_backbone(base.get_vision_tower_aux(), images_aux).to(
        dtype=image_features.dtype, device=image_features.device)
    image_features, image_aux_features = official_unified_resampler(model, image_features, image_aux_features_raw)
    image_features = image_features + image_aux_features
    return base.mm_projector(image_features)


def official_prepare_inputs(model, input_ids, attention_mask, images, images_aux, padding_side: str = "right"):
    """``prepare_inputs_labels_for_multimodal`` (inference: no labels; ``attention_mask`` given) ->
    (inputs_embeds, attention_mask, position_ids)."""
    image_features = official_encode_images(model, images, images_aux)
    embed_tokens = model.get_model().embed_tokens
    position_ids = torch.arange(0, input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    given_mask = attention_mask
    attention_mask = attention_mask.bool()
    input_ids = [cur_input_ids[cur_attention_mask] for cur_input_ids, cur_attention_mask in zip(input_ids, attention_mask)]
    new_input_embeds, cur_image_idx = [], 0
    for cur_input_ids in input_ids:  # (labels: IGNORE_INDEX over the image; inference has none)
        num_images = int((cur_input_ids == IMAGE_TOKEN_INDEX).sum())
        if num_images == 0:
            new_input_embeds.append(torch.cat([embed_tokens(cur_input_ids), image_features[cur_image_idx][0:0]], dim=0))
            cur_image_idx += 1
            continue
        image_token_indices = [-1] + torch.where(cur_input_ids == IMAGE_TOKEN_INDEX)[0].tolist() + [cur_input_ids.shape[0]]
        cur_input_ids_noim = [cur_input_ids[image_token_indices[i] + 1:image_token_indices[i + 1]]
                              for i in range(len(image_token_indices) - 1)]
        split_sizes = [x.shape[0] for x in cur_input_ids_noim]
        cur_input_embeds_no_im = torch.split(embed_tokens(torch.cat(cur_input_ids_noim)), split_sizes, dim=0)
        cur_new_input_embeds = []
        for i in range(num_images + 1):
            cur_new_input_embeds.append(cur_input_embeds_no_im[i])
            if i < num_images:
                cur_new_input_embeds.append(image_features[cur_image_idx])
                cur_image_idx += 1
        new_input_embeds.append(torch.cat(cur_new_input_embeds))
    max_len = max(x.shape[0] for x in new_input_embeds)
    batch_size = len(new_input_embeds)
    padded = []
    attention_mask = torch.zeros((batch_size, max_len), dtype=attention_mask.dtype, device=attention_mask.device)
    position_ids = torch.zeros((batch_size, max_len), dtype=position_ids.dtype, device=position_ids.device)
    for i, cur_new_embed in enumerate(new_input_embeds):
        cur_len = cur_new_embed.shape[0]
        pad = torch.zeros((max_len - cur_len, cur_new_embed.shape[1]), dtype=cur_new_embed.dtype, device=cur_new_embed.device)
        if padding_side == "left":
            padded.append(torch.cat((pad, cur_new_embed), dim=0))
            attention_mask[i, -cur_len:] = True
            position_ids[i, -cur_len:] = torch.arange(0, cur_len, dtype=position_ids.dtype, device=position_ids.device)
        else:
            padded.append(torch.cat((cur_new_embed, pad), dim=0))
            attention_mask[i, :cur_len] = True
            position_ids[i, :cur_len] = torch.arange(0, cur_len, dtype=position_ids.dtype, device=position_ids.device)
    return torch.stack(padded, dim=0), attention_mask.to(dtype=given_mask.dtype), None


def official_logits(model, input_ids, attention_mask, images_aux, images=None, padding_side: str = "right"):
    """``MGMLlamaForCausalLM.forward(input_ids, attention_mask, images, images_aux)``'s logits (float32).
    ``images`` (LR) default: made from ``images_aux`` as the official loader makes it."""
    if images is None:
        images = official_lr_from_hr(images_aux, model.get_vision_tower().image_size)
    inputs_embeds, attention_mask, position_ids = official_prepare_inputs(
        model, input_ids, attention_mask, images, images_aux, padding_side
    )
    with torch.no_grad():
        hidden = LlamaModel.forward(model.get_model(), inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                    position_ids=position_ids).last_hidden_state
        return model.lm_head(hidden).float()
