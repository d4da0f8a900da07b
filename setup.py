from setuptools import setup

# The top-level folders compress/, models/ and evaluation/ are installed as dreamlite.compress, dreamlite.models and
# dreamlite.evaluation; find_packages would not add the prefix, so the packages are listed explicitly.
PACKAGES = {
    "dreamlite": "dreamlite",
    "dreamlite.stages": "dreamlite/stages",
    "dreamlite.compress": "compress",
    "dreamlite.compress.prune": "compress/prune",
    "dreamlite.compress.distill": "compress/distill",
    "dreamlite.compress.quantize": "compress/quantize",
    "dreamlite.models": "models",
    "dreamlite.evaluation": "evaluation",
    "dreamlite.evaluation.shapes": "evaluation/shapes",
}

# Qualcomm QNN execution provider (HTP backend; a host simulator on Linux x86_64): for dreamlite qnn-check.
QNN = "onnxruntime-qnn>=2.7; platform_system == \"Linux\" and platform_machine == \"x86_64\""

setup(
    name="dreamlite",
    version="0.1.0",
    description="Derive a DreamLite-class mobile diffusion model (generation + editing) from a server U-Net",
    python_requires=">=3.10",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # the shipped shapes teacher (models/zoo/<name>/...), so `zoo:shapes-server` resolves in a regular install too
    package_data={"dreamlite.models": ["zoo/*/*.json", "zoo/*/*.md", "zoo/*/*.safetensors", "zoo/*/*/*"]},
    install_requires=[
        "torch",
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=10",
        "click>=8.1",
        "pydantic>=2.5",
        "pyyaml>=6",
        "rich>=13",
        "safetensors>=0.4",
        "diffusers==0.42.1",
        "accelerate>=1.0",
        "matplotlib>=3.7",
        "onnx>=1.16",
        "onnxscript>=0.2",
        "onnxruntime>=1.20",
        "torch-pruning==1.6.1",
    ],
    extras_require={
        "qnn": [QNN],
        # Intel Neural Compressor, torch-side INT8 (benchmarks/artifact_quality.py's comparison column)
        "inc": ["neural-compressor-pt>=3.4"],
        "test": ["pytest>=7", "transformers>=4.40", QNN],
    },
    entry_points={"console_scripts": ["dreamlite=dreamlite.cli:main"]},
)
