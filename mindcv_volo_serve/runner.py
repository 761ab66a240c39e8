"""Classify pictures with an exported ONNX file in onnxruntime: the file carries its preprocessing and class
names in its metadata (written by `python -m mindcv_volo.export`), so it needs nothing else.

    python -m mindcv_volo_serve --onnx_path volo_d1_224.onnx --image_path PICTURE_OR_FOLDER [--top_k 5]

prints one JSON line per picture, as infer.py does with a checkpoint: {"image": path, "top5": [[class name,
probability], ...]}.
"""
import argparse
import json
import os

from .errors import UserError
from .pictures import image_files, predict, print_predictions
from .preprocessing import Preprocessing

# metadata_props of an exported ONNX file
MODEL_KEY = "mindcv_volo.model"  # the registered name, e.g. volo_d1_224
PREPROCESSING_KEY = "mindcv_volo.preprocessing"  # JSON: Preprocessing's fields size, crop_pct, interpolation, mean, std
CLASS_NAMES_KEY = "mindcv_volo.class_names"  # JSON: a list, one name per output of the model


def onnx_metadata(model_name, preprocessing, class_names):
    """The metadata_props an exported ONNX file carries: {key: text}."""
    return {MODEL_KEY: model_name, PREPROCESSING_KEY: json.dumps(preprocessing._asdict()),
            CLASS_NAMES_KEY: json.dumps(list(class_names))}


class OnnxClassifier:
    """An exported ONNX file in an onnxruntime session, with the preprocessing and class names it carries."""

    def __init__(self, onnx_path):
        try:
            import onnxruntime
            from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
        except ModuleNotFoundError:
            raise UserError("running an ONNX file needs onnxruntime: pip install onnxruntime") from None
        if not os.path.isfile(onnx_path):
            raise UserError(f"ONNX file not found: {onnx_path}")
        try:
            self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        except (Fail, InvalidGraph, InvalidProtobuf) as err:
            raise UserError(f"onnxruntime cannot load {onnx_path}: {str(err).splitlines()[0]}") from None
        metadata = self.session.get_modelmeta().custom_metadata_map
        if PREPROCESSING_KEY not in metadata or CLASS_NAMES_KEY not in metadata:
            raise UserError(f"{onnx_path} carries no preprocessing and class names (metadata {PREPROCESSING_KEY}, "
                            f"{CLASS_NAMES_KEY}); export it again with python -m mindcv_volo.export")
        described = json.loads(metadata[PREPROCESSING_KEY])
        self.preprocessing = Preprocessing(**{**described, "mean": tuple(described["mean"]),
                                              "std": tuple(described["std"])})
        self.class_names = json.loads(metadata[CLASS_NAMES_KEY])
        self.model_name = metadata.get(MODEL_KEY)
        image = self.session.get_inputs()[0]
        self.input_name = image.name
        # a static export runs its one batch size; a --dynamic_batch export has a named axis
        self.fixed_batch = image.shape[0] if isinstance(image.shape[0], int) else None

    def __call__(self, images):
        """Logits, float32 (batch, classes), of a float32 batch of model inputs."""
        return self.session.run(None, {self.input_name: images})[0]

    def predict(self, paths, k=5, batch_size=8):
        """`pictures.predict` for this file's model: (path, top-k, None) or (path, None, UserError) per picture."""
        return predict(self, self.preprocessing, paths, self.class_names, min(k, len(self.class_names)),
                       self.fixed_batch or batch_size)


def classify(onnx_path, image_path, top_k=5, batch_size=8):
    """[(picture path, [[class name, probability], ...] of its top_k classes)] for the picture `image_path` or
    the pictures under the folder `image_path`, by the exported ONNX file `onnx_path`; a UserError for a
    picture that cannot be read."""
    results = []
    for path, top, error in OnnxClassifier(onnx_path).predict(image_files(str(image_path)), top_k, batch_size):
        if error is not None:
            raise error
        results.append((path, top))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mindcv_volo_serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--onnx_path", required=True, help="an ONNX file from python -m mindcv_volo.export")
    parser.add_argument("--image_path", required=True, help="a picture, or a folder of pictures (recursively)")
    parser.add_argument("--top_k", type=int, default=5, help="classes printed per picture")
    parser.add_argument("--batch_size", type=int, default=8, help="pictures per run (a static export: its own)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError(f"--top_k and --batch_size must be at least 1, got {args.top_k} and {args.batch_size}")
    classifier = OnnxClassifier(args.onnx_path)
    print_predictions(classifier.predict(image_files(args.image_path), args.top_k, args.batch_size))
