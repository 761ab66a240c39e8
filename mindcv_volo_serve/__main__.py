"""`python -m mindcv_volo_serve --onnx_path FILE.onnx --image_path PICTURE_OR_FOLDER` (see runner.py)."""
from .errors import run_cli
from .runner import main

run_cli(main)
