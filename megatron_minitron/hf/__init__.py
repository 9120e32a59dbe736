"""Hugging Face Llama-family models in and out of our checkpoints."""

from megatron_minitron.hf.convert import export_hf, import_hf  # noqa: F401
from megatron_minitron.hf.mapping import config_from_hf, hf_config_from  # noqa: F401
