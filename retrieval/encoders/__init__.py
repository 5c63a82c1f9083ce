"""Encoders: the interface, the registry of named configs, and one sub-module per family."""

from retrieval.encoders.base import Encoder, EncoderConfig
from retrieval.encoders.registry import get_config, list_configs, load_encoder

__all__ = ["Encoder", "EncoderConfig", "get_config", "list_configs", "load_encoder"]
