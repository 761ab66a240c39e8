"""Weights in and out: safe reading of PyTorch and safetensors files (`torch_zip`), name mapping and strict
checks (`state`), the pos_embed resize (`pos_embed`), MindSpore checkpoints (`checkpoint`), conversion of
the official weights (`convert`) and export for deployment (`export`)."""
from .checkpoint import load_checkpoint_into, read_checkpoint, save_checkpoint
from .convert import convert_into

__all__ = ["convert_into", "load_checkpoint_into", "read_checkpoint", "save_checkpoint"]
