"""The option table: YAML sets defaults, the command line overrides them, and every mistake is one UserError."""
import os

import pytest
import yaml

from mindcv_volo.engine.config import OPTIONS, _convert, parse_config, save_config
from mindcv_volo.errors import UserError, run_cli


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(argv):
    with pytest.raises(UserError) as info:
        parse_config(argv)
    return str(info.value)


def test_table_defaults_are_valid_values():
    for opt in OPTIONS.values():
        assert _convert(opt, opt.default, opt.name) == opt.default, opt.name
    args = parse_config([])
    assert (args.batch_size, args.lr, args.opt, args.config, args.crop_pct) == (128, 1.6e-3, "adamw", "", None)


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    # `1e-3` without a dot is a string to PyYAML; it must still be read as a number.
    path = write(tmp_path, "batch_size: 64\nlr: 1e-3\nopt: sgd\nscale: [0.5, 1]\n")
    args = parse_config(["-c", path, "--batch_size", "32", "--min_lr=2e-6"])
    assert (args.batch_size, args.lr, args.opt, args.min_lr) == (32, 0.001, "sgd", 2e-6)
    assert args.scale == [0.5, 1.0] and args.config == path
    assert args.epoch_size == 300  # in neither: the table default


@pytest.mark.parametrize("text, expected", [
    ("false", False), ("'False'", False), ("'false'", False), ("0", False), ("'0'", False), ("no", False),
    ("'no'", False), ("'OFF'", False),
    ("true", True), ("'True'", True), ("yes", True), ("'yes'", True), ("1", True), ("'1'", True), ("on", True),
])
def test_yaml_booleans(tmp_path, text, expected):
    assert parse_config(["-c", write(tmp_path, f"resume: {text}\n")]).resume is expected


@pytest.mark.parametrize("word, expected", [
    ("False", False), ("false", False), ("0", False), ("no", False), ("OFF", False),
    ("True", True), ("true", True), ("yes", True), ("1", True), ("on", True),
])
def test_command_line_booleans(tmp_path, word, expected):
    path = write(tmp_path, f"resume: {str(not expected).lower()}\n")
    assert parse_config(["-c", path, "--resume", word]).resume is expected
    assert parse_config(["-c", path, f"--resume={word}"]).resume is expected


def test_bare_boolean_flag_means_true():
    assert parse_config(["--resume"]).resume is True


def test_bad_booleans(tmp_path):
    assert error_of(["--resume", "maybe"]) == (
        "--resume on the command line must be a boolean (true/false, yes/no, on/off, 1/0), got 'maybe'")
    path = write(tmp_path, "shuffle: 2\n")
    assert error_of(["-c", path]) == f"shuffle in {path} must be a boolean (true/false, yes/no, on/off, 1/0), got 2"


def test_unknown_yaml_key_message(tmp_path):
    path = write(tmp_path, "lr: 0.001\nbach_size: 64\n")
    assert error_of(["-c", path]) == (
        f"unknown key in {path}: 'bach_size' (did you mean 'batch_size' or 'epoch_size'?); "
        "run with --help to list the valid keys")


def test_unknown_yaml_keys_are_all_listed(tmp_path):
    path = write(tmp_path, "zzz: 1\nlrr: 0.1\n")
    assert error_of(["-c", path]) == (
        f"unknown keys in {path}: 'zzz', 'lrr' (did you mean 'lr'?); run with --help to list the valid keys")


def test_wrong_types(tmp_path):
    path = write(tmp_path, "batch_size: abc\n")
    assert error_of(["-c", path]) == f"batch_size in {path} must be an integer, got 'abc'"
    path = write(tmp_path, "lr: [0.1, 0.2]\n")
    assert error_of(["-c", path]) == f"lr in {path} must be a number, got [0.1, 0.2]"
    assert error_of(["--batch_size", "12.5"]) == "--batch_size on the command line must be an integer, got '12.5'"
    assert error_of(["--scale", "0.5", "big"]) == (
        "--scale on the command line must be a list of numbers, got ['0.5', 'big']")
    assert error_of(["--lr", "null"]) == "--lr on the command line must be a number, got 'null'"


def test_nullable_options(tmp_path):
    path = write(tmp_path, "color_jitter: null\ncrop_pct: 0.96\nauto_augment: randaug-m9-mstd0.5-inc1\n")
    args = parse_config(["-c", path])
    assert (args.color_jitter, args.crop_pct, args.auto_augment) == (None, 0.96, "randaug-m9-mstd0.5-inc1")
    args = parse_config(["-c", path, "--crop_pct", "None", "--auto_augment", "null", "--decay_epochs", "30"])
    assert (args.crop_pct, args.auto_augment, args.decay_epochs) == (None, None, 30)
    assert error_of(["--crop_pct", "abc"]) == "--crop_pct on the command line must be a number or null, got 'abc'"


@pytest.mark.parametrize("argv", [["--scale", "0.5,1"], ["--scale", "0.5", "1"], ["--scale", "[0.5, 1]"]])
def test_command_line_lists(argv):
    assert parse_config(argv).scale == [0.5, 1.0]


def test_choices(tmp_path):
    path = write(tmp_path, "opt: sgdd\n")
    assert error_of(["-c", path]) == (
        f"opt in {path} must be one of adamw, adam, sgd, momentum, lamb, lion; got 'sgdd'")
    assert error_of(["--mode", "2"]) == "--mode on the command line must be one of 0, 1; got '2'"
    assert error_of(["--device_target", "TPU"]) == (
        "--device_target on the command line must be one of Ascend, GPU, CPU, auto; got 'TPU'")
    assert parse_config(["--mode", "1", "--loss", "token_label"]).mode == 1


def test_config_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error_of(["-c", missing]) == f"config file not found: {missing}"
    assert error_of(["--config", str(tmp_path)]) == f"cannot read config file {tmp_path}: Is a directory"
    path = write(tmp_path, "lr: 0.1\nscale: [0.5, 1\n")
    assert error_of(["-c", path]).startswith(f"invalid YAML in {path} at line 3, column 1: ")
    path = write(tmp_path, "- lr\n- 0.1\n")
    assert error_of(["-c", path]) == (
        f"{path} must hold a mapping of option names to values (`key: value` lines), not a list")
    assert parse_config(["-c", write(tmp_path, "# nothing set yet\n")]).lr == 1.6e-3


def test_command_line_mistakes_raise_user_error():
    assert error_of(["--bach_size", "64"]) == (
        "unknown command-line option: --bach_size (did you mean --batch_size or --epoch_size?); "
        "run with --help to list the valid options")
    assert error_of(["--batch", "64"]).startswith("unknown command-line option: --batch ")  # no abbreviations
    assert error_of(["--lr"]) == "argument --lr: expected one argument; run with --help to list the valid options"
    assert error_of(["-c"]).startswith("argument -c/--config: expected one argument")
    assert error_of(["train"]) == "unexpected command-line arguments: train (options are written --name value)"


def test_user_error_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(parse_config, ["--nope", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command-line option: --nope") and err.count("\n") == 1


def test_help_shows_yaml_defaults(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["-c", write(tmp_path, "lr: 0.004\n"), "--help"], description="Train VOLO")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Train VOLO" in out and "peak learning rate (default: 0.004)" in out


def test_save_config_round_trips(tmp_path):
    recipe = write(tmp_path, "lr: 1e-3\nresume: 'no'\nauto_augment: randaug-m9-mstd0.5-inc1\n")
    args = parse_config(["-c", recipe, "--batch_size", "32", "--mean", "0.5,0.5,0.5", "--crop_pct", "0.9"])
    args.rank_id = 3  # set at run time by train.py: not an option, so not saved
    saved = str(tmp_path / "run" / "config.yaml")
    save_config(args, saved)
    save_config(args, saved)  # overwriting an existing file works too

    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert list(data) == sorted(OPTIONS) and "rank_id" not in data
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temporary file left behind
    again = vars(parse_config(["-c", saved]))
    expected = {k: v for k, v in vars(args).items() if k != "rank_id"}
    assert again.pop("config") == saved and expected.pop("config") == recipe
    assert again == expected


def test_mapping_option(tmp_path):
    path = write(tmp_path, "arch_overrides:\n  layers: [1, 1, 1, 1]\n  img_size: 32\n")
    assert parse_config(["-c", path]).arch_overrides == {"layers": [1, 1, 1, 1], "img_size": 32}
    assert parse_config([]).arch_overrides == {}
    # On the command line as JSON or YAML flow text.
    assert parse_config(["--arch_overrides", '{"layers": [2, 2, 2, 2]}']).arch_overrides == {"layers": [2, 2, 2, 2]}
    assert parse_config(["--arch_overrides", "{mlp_ratio: 2.0}"]).arch_overrides == {"mlp_ratio": 2.0}
    expected = "a mapping of names to values, e.g. '{a: 1, b: [2, 3]}'"
    assert error_of(["--arch_overrides", "[1, 2]"]) == (
        f"--arch_overrides on the command line must be {expected}, got '[1, 2]'")
    assert error_of(["--arch_overrides", "{a: [1"]) == (
        f"--arch_overrides on the command line must be {expected}, got '{{a: [1'")
    path = write(tmp_path, "arch_overrides: 3\n")
    assert error_of(["-c", path]) == f"arch_overrides in {path} must be {expected}, got 3"
