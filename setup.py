from setuptools import find_packages, setup

setup(
    name="minialign",
    version="0.1.0",
    description="From-scratch, pure-PyTorch alignment of small language models: SFT, reward models, DPO, PPO, GRPO.",
    packages=find_packages(include=["minialign", "minialign.*"]),
    python_requires=">=3.9",
    # torch is pinned loosely on purpose: install the build you want first (the CPU one needs its index, see the
    # README quickstart) and pip keeps it.
    install_requires=["torch>=2.4", "numpy", "sentencepiece", "tqdm"],
    extras_require={
        # the tests: matplotlib so they also draw the report's plots; transformers (+ the hf extra) for the
        # Hugging Face parity and interop tests and tensorboard for the logger test, which skip without them
        "dev": ["pytest", "matplotlib", "safetensors", "tokenizers", "transformers", "tensorboard"],
        "plots": ["matplotlib"],
        "hf": ["safetensors", "tokenizers"],  # load / export Hugging Face Llama and Qwen2 folders
        "tensorboard": ["tensorboard"],
        "bench": ["transformers", "trl", "safetensors", "tokenizers"],
    },
)
