from setuptools import find_packages, setup

setup(
    name="megatron-switch",
    version="0.1.0",
    description="Switch Transformer (top-1 mixture of experts) for NVIDIA Megatron-Core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_switch", "megatron_switch.*"]),
    package_data={"megatron_switch.planning": ["presets.toml"]},
    # `megatron-switch sbatch` finds its template in launch/ of a checkout, else here.
    data_files=[("share/megatron-switch/launch", ["launch/switch.sbatch.template"])],
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1,<0.17",
        "numpy",
        "psutil",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # Transformer Engine's PyTorch extension compiles against CUDA: install it in a GPU image.
        "te": ["transformer-engine[pytorch]>=2.0"],
        "dali": ["nvidia-dali-cuda120>=1.40"],
        "plots": ["matplotlib>=3.5"],  # the trainer's loss and expert-load PNGs (skipped, with a line, without)
        "tensorboard": ["tensorboard>=2.10"],  # --tensorboard-dir
        # The layer benchmark's peers (benchmarks/layer.py). DeepSpeed's compiled ops are not needed:
        # DS_BUILD_OPS=0 pip install -c constraints.txt "torch==2.13.0" -e ".[bench]" (torch pinned).
        "bench": ["deepspeed>=0.19", "transformers>=5.24"],
        # The test and demo stack; constraints.txt pins the versions it was last run with.
        "dev": ["pytest>=8", "hypothesis>=6", "transformers>=5.24", "safetensors", "matplotlib>=3.5",
                "tensorboard>=2.10"],
    },
    entry_points={"console_scripts": ["megatron-switch=megatron_switch.cli:main"]},
)
