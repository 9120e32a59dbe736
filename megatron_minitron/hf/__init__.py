"""Hugging Face Llama-family, Qwen and Nemotron models, and the Mixtral, Qwen2-MoE and Qwen3-MoE
mixtures of experts, in and out of our checkpoints."""

from megatron_minitron.hf.convert import export_hf, import_hf  # noqa: F401
from megatron_minitron.hf.mapping import (  # noqa: F401
    config_from_hf,
    hf_config_from,
    hf_exportable,
)
