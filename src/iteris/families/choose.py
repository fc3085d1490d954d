"""Which family a merge belongs to, decided once from the config."""

from __future__ import annotations

from ..config import MergeConfig
from ..errors import IterisError
from .diffusion import PipelineJob, is_pipeline_dir
from .transformers import ModelJob


def family_for(cfg: MergeConfig, ranks) -> type[ModelJob] | type[PipelineJob]:
    """The job for this config: a diffusers pipeline, or a transformers model (text or images, whole or
    sharded over processes)."""
    if cfg.model_type == "diffusion" or (cfg.model_type == "auto" and is_pipeline_dir(cfg.base_model)):
        if ranks is not None:
            raise IterisError("diffusers pipelines merge in one process; start it without torchrun")
        if cfg.device_map:
            raise IterisError("device_map spreads a transformers model over GPUs; unset it for a diffusers pipeline")
        return PipelineJob
    return ModelJob
