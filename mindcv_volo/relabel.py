"""Make token-label maps with a teacher: `python -m mindcv_volo.relabel --ckpt_path X --data_dir D --out DIR`.

See `token_labeling.relabel` for what is written and how a run resumes or shards under msrun.
"""
from .engine.config import parse_config
from .errors import run_cli
from .token_labeling.relabel import relabel


def main(argv=None):
    relabel(parse_config(argv, "relabel"))


if __name__ == "__main__":
    run_cli(main)
