"""mindcv-volo without MindSpore: what classifying pictures with an exported model needs, and nothing more.

    python -m mindcv_volo_serve --onnx_path volo_d1_224.onnx --image_path PICTURE_OR_FOLDER [--top_k 5]

`classify(onnx_path, image_path)` runs an ONNX file written by `python -m mindcv_volo.export` in onnxruntime,
on pictures preprocessed as the model evaluates (`Preprocessing`, read from the file's metadata), and returns
the top-k with the class names the file carries. Nothing here imports MindSpore or MindCV (importing
`mindcv_volo` does, for its model registry): this package runs on numpy, Pillow and onnxruntime alone, and
mindcv_volo takes its evaluation preprocessing, picture listing, top-k and one-line errors from here, so
validation, infer.py and a deployed ONNX file share one definition.
"""
from .errors import UserError
from .pictures import IMAGE_SUFFIXES, image_files, top_k
from .preprocessing import Preprocessing
from .runner import classify

__all__ = ["IMAGE_SUFFIXES", "Preprocessing", "UserError", "classify", "image_files", "top_k"]
