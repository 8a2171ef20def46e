"""``LlavaTrainer``: the HF Trainer with LLaVA's sampler, projector learning rate and bad-sample report."""
from __future__ import annotations

import logging
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from .sampler import ModalityLengthGroupedSampler

logger = logging.getLogger(__name__)

PROJECTOR_KEY = "mm_projector"


def is_projector_parameter(name: str) -> bool:
    return PROJECTOR_KEY in name.split(".")


class LlavaTrainer(Trainer):
    """Adds to ``transformers.Trainer``:

    - ``group_by_modality_length``: batches of one modality, similar lengths (``ModalityLengthGroupedSampler``);
    - ``mm_projector_lr``: the projector's own learning rate (weight decay split as the Trainer does);
    - a count of the samples the dataset skipped (``skipped_samples`` in the logs and ``skipped`` here).

    [VisionZip-LLaVA] Checkpoints (``checkpoint-*``) are the Trainer's own, with the whole model state, for
    every mode: the original saved only ``mm_projector.bin`` in a projector-only run's checkpoints, which
    could not be resumed. The final projector-only output is still ``mm_projector.bin`` (see train.py).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: list[str] = []

    # ---- data ----

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.group_by_modality_length:
            return super().get_train_dataloader()
        dataset = self.train_dataset
        if not hasattr(dataset, "modality_lengths"):
            raise ValueError(
                "group_by_modality_length needs a dataset with modality_lengths (LazySupervisedDataset)"
            )
        sampler = ModalityLengthGroupedSampler(
            dataset.modality_lengths,
            batch_size=self.args.per_device_train_batch_size,
            world_size=self.args.world_size,
            seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
        )
        loader = DataLoader(
            dataset,
            batch_size=self.args.per_device_train_batch_size,
            sampler=sampler,
            collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers and self.args.dataloader_num_workers > 0,
            prefetch_factor=self.args.dataloader_prefetch_factor if self.args.dataloader_num_workers > 0 else None,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        return self.accelerator.prepare(loader)

    # ---- optimisation ----

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if self.args.mm_projector_lr is None and not self.uses_zero_offload():
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        projector_lr = self.args.mm_projector_lr
        groups: dict[tuple[bool, bool], list] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                key = (name in decay, projector_lr is not None and is_projector_parameter(name))
                groups.setdefault(key, []).append(parameter)
        parameter_groups = []
        for (decays, is_projector), parameters in sorted(groups.items()):
            group = {"params": parameters, "weight_decay": self.args.weight_decay if decays else 0.0}
            if is_projector:
                group["lr"] = projector_lr
            parameter_groups.append(group)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if self.uses_zero_offload():
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed insists on its CPU Adam there.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer_cls = DeepSpeedCPUAdam
            optimizer_kwargs = {
                "lr": self.args.learning_rate,
                "betas": (self.args.adam_beta1, self.args.adam_beta2),
                "eps": self.args.adam_epsilon,
                "adamw_mode": True,
            }
        self.optimizer = optimizer_cls(parameter_groups, **optimizer_kwargs)
        return self.optimizer

    def uses_zero_offload(self) -> bool:
        ds_config = getattr(self.args, "hf_deepspeed_config", None)
        return ds_config is not None and ds_config.is_offload()

    # ---- bad samples ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped_samples", None)
        if skipped:
            self.skipped.extend(skipped)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs["skipped_samples"] = len(self.skipped)
        super().log(logs, start_time)

    def total_skipped(self) -> int:
        """Skipped samples summed over processes."""
        count = torch.tensor([len(self.skipped)], device=self.args.device)
        return int(self.accelerator.reduce(count, reduction="sum").item())

