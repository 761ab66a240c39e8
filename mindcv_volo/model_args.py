"""Arguments shared by the command-line tools that build a model (convert, export, relabel)."""
import json

from .errors import UserError
from .models import create


def arch_overrides(text):
    """`--arch-overrides '{"layers": [1, 1, 1, 1], ...}'`: VOLO constructor arguments over a variant's."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--arch-overrides is not valid JSON ({err.msg} at column {err.colno}): {text}") from None
    if not isinstance(value, dict):
        raise UserError(f"--arch-overrides must be a JSON object of VOLO arguments, got: {text}")
    return value


def add_model_arguments(parser, num_classes_help):
    parser.add_argument("--model", required=True, help="registered model name, e.g. volo_d1_224")
    parser.add_argument("--num-classes", type=int, default=None, help=num_classes_help)
    parser.add_argument("--arch-overrides", type=arch_overrides, default={},
                        help="JSON of VOLO constructor arguments over the variant's (for custom models)")


def create_from_args(args):
    """The model named by --model, with --arch-overrides, and --num-classes over both."""
    kwargs = dict(args.arch_overrides)
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    return create(args.model, **kwargs)
