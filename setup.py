from setuptools import find_packages, setup

setup(
    name="mindcv-volo",
    version="0.1.0",
    description="The official VOLO (Vision Outlooker) in MindSpore, registered in MindCV's model zoo",
    packages=find_packages(include=["mindcv_volo", "mindcv_volo.*", "mindcv_volo_serve"]),
    # the fused CPU kernels' source (compiled with the machine's g++ on first use) and ImageNet's class names
    package_data={"mindcv_volo.models": ["cpu_kernels.cc", "imagenet_classes.txt"]},
    python_requires=">=3.9",
    install_requires=[
        "mindspore==2.10.0",
        "mindcv==0.3.0",
        # MindSpore 2.10's compiled paths (ops.unfold among them) crash under numpy 2.
        "numpy>=1.22,<2",
        "pyyaml",
        "safetensors",
        # pretrained=True: the official weights from timm's hub repositories (hf_hub_download and its cache)
        "huggingface_hub",
        "pillow",
        "tqdm",
        "matplotlib",
        # token labeling's data workers hold numpy's BLAS to one thread (token_labeling.label_maps)
        "threadpoolctl",
    ],
    # test: what the suite needs beyond the package (pytest-xdist: one worker per core, see pytest.ini); quickstart: the digits (scikit-learn ships them);
    # onnx: `export --file_format ONNX --dynamic_batch` (onnx) and running the files (onnxruntime)
    extras_require={"test": ["pytest", "pytest-xdist", "scikit-learn", "onnx", "onnxruntime"], "quickstart": ["scikit-learn"],
                    "onnx": ["onnx", "onnxruntime"]},
)
