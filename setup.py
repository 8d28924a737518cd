"""pgolf: a custom-kernel performance stack for the parameter-golf problem."""
import sys

from setuptools import find_packages, setup

install_requires = ["torch>=2.4", "numpy", "sentencepiece", "zstandard", "tqdm", "brotli"]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="pgolf",
    version="0.1.0",
    description="Triton kernels, model, training, quantization and exact evaluation for parameter golf",
    packages=find_packages(include=["pgolf", "pgolf.*"]),
    package_data={"pgolf.data": ["sample/*"]},
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "matplotlib"],
        "flash": ["flash-attn"],
        "hub": ["huggingface_hub"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["pgolf=pgolf.cli:main"]},
)
