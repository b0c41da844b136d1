"""A loaded model: config, storage-layout params, tokenizer."""
from __future__ import annotations

import dataclasses

from ferry.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    config: ModelConfig
    params: dict            # storage layout (models/config.py), numpy arrays
    tokenizer: object       # models.tokenizer.Tokenizer
    name: str
    source_path: str
