from setuptools import find_packages, setup

setup(
    name="mthl-ds",
    version="0.1.0",
    description="Multi-task heterogeneous vision learners on DeepSpeed-MoE",
    packages=find_packages(include=["mthl_ds", "mthl_ds.*"]),
    package_data={"mthl_ds": ["recipes/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "timm==1.0.31",
        "webdataset==1.0.2",
        "pyyaml>=6",
        "segmentation-models-pytorch>=0.5",
        "pycocotools>=2.0.8",
        "safetensors>=0.4",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "numpy>=1.26",
        "pillow>=10",
        "scipy>=1.11",  # torchvision StanfordCars reads the devkit .mat files with it
        "xxhash>=3.4",  # checkpoint manifests and export checksums (mthl_ds.artifacts.manifest)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        # mmdet's and mmseg's own RetinaNet and UperNet parts, which tests/test_oracle.py compares ours with;
        # mmseg's utils import ftfy and regex. mmcv-lite has no compiled ops: the tests stand one in (nms).
        "oracle": ["mmengine==0.10.7", "mmcv-lite==2.1.0", "mmdet==3.3.0", "mmsegmentation==1.2.2", "ftfy>=6",
                   "regex>=2023"],
    },
    entry_points={"console_scripts": ["mthl-ds=mthl_ds.cli:main"]},
)
