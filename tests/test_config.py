"""The option table: YAML sets defaults, the command line overrides them, and every mistake is one UserError."""
import os
from types import SimpleNamespace

import pytest
import yaml

from conftest import FIXTURES
from mindcv_volo.engine.config import OPTIONS, _convert, parse_config, save_config
from mindcv_volo.errors import UserError, run_cli


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse(argv, command="train"):
    """Every option's value, by name."""
    return SimpleNamespace(**parse_config(argv, command).as_dict())


def error_of(argv, command="train"):
    with pytest.raises(UserError) as info:
        parse_config(argv, command)
    return str(info.value)


def test_table_defaults_are_valid_values():
    for opt in OPTIONS.values():
        assert _convert(opt, opt.default, opt.name) == opt.default, opt.name
    args = parse([])
    assert (args.batch_size, args.lr, args.opt, args.config, args.crop_pct) == (128, 1.6e-3, "adamw", "", None)
    assert args.model == "volo_d1_224" and parse([], "validate").model is None  # validate: the checkpoint's


def test_sections_hold_their_options():
    config = parse_config(["--batch_size", "32", "--weight_decay", "0.1"])
    assert config.data.batch_size == 32 and config.optimizer.weight_decay == 0.1
    with pytest.raises(AttributeError):
        config.data.batch_size = 64  # a part of the run cannot write into the options


def test_yaml_sets_defaults_and_command_line_overrides(tmp_path):
    # `1e-3` without a dot is a string to PyYAML; it must still be read as a number.
    path = write(tmp_path, "batch_size: 64\nlr: 1e-3\nopt: sgd\nscale: [0.5, 1]\n")
    args = parse(["-c", path, "--batch_size", "32", "--min_lr=2e-6"])
    assert (args.batch_size, args.lr, args.opt, args.min_lr) == (32, 0.001, "sgd", 2e-6)
    assert args.scale == [0.5, 1.0] and args.config == path
    assert args.epoch_size == 300  # in neither: the table default


@pytest.mark.parametrize("text, expected", [
    ("false", False), ("'False'", False), ("'false'", False), ("0", False), ("'0'", False), ("no", False),
    ("'no'", False), ("'OFF'", False),
    ("true", True), ("'True'", True), ("yes", True), ("'yes'", True), ("1", True), ("'1'", True), ("on", True),
])
def test_yaml_booleans(tmp_path, text, expected):
    assert parse(["-c", write(tmp_path, f"resume: {text}\n")]).resume is expected


@pytest.mark.parametrize("word, expected", [
    ("False", False), ("false", False), ("0", False), ("no", False), ("OFF", False),
    ("True", True), ("true", True), ("yes", True), ("1", True), ("on", True),
])
def test_command_line_booleans(tmp_path, word, expected):
    path = write(tmp_path, f"resume: {str(not expected).lower()}\n")
    assert parse(["-c", path, "--resume", word]).resume is expected
    assert parse(["-c", path, f"--resume={word}"]).resume is expected


def test_bare_boolean_flag_means_true():
    assert parse(["--resume"]).resume is True


def test_bad_booleans(tmp_path):
    assert error_of(["--resume", "maybe"]) == (
        "--resume on the command line must be a boolean (true/false, yes/no, on/off, 1/0), got 'maybe'")
    path = write(tmp_path, "shuffle: 2\n")
    assert error_of(["-c", path]) == f"shuffle in {path} must be a boolean (true/false, yes/no, on/off, 1/0), got 2"


def test_unknown_yaml_key_message(tmp_path):
    path = write(tmp_path, "lr: 0.001\nbach_size: 64\n")
    assert error_of(["-c", path]) == (
        f"unknown key in {path}: 'bach_size' (did you mean 'batch_size' or 'epoch_size' or 'image_size'?); "
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
    args = parse(["-c", path])
    assert (args.color_jitter, args.crop_pct, args.auto_augment) == (None, 0.96, "randaug-m9-mstd0.5-inc1")
    args = parse(["-c", path, "--crop_pct", "None", "--auto_augment", "null", "--decay_epochs", "30"])
    assert (args.crop_pct, args.auto_augment, args.decay_epochs) == (None, None, 30)
    assert error_of(["--crop_pct", "abc"]) == "--crop_pct on the command line must be a number or null, got 'abc'"


@pytest.mark.parametrize("argv", [["--scale", "0.5,1"], ["--scale", "0.5", "1"], ["--scale", "[0.5, 1]"]])
def test_command_line_lists(argv):
    assert parse(argv).scale == [0.5, 1.0]


def test_choices(tmp_path):
    path = write(tmp_path, "opt: sgdd\n")
    assert error_of(["-c", path]) == (
        f"opt in {path} must be one of sgd, momentum, nesterov, adam, adamw, lion, nadam, adan, rmsprop, adagrad, "
        "lamb; got 'sgdd'")
    assert error_of(["--mode", "2"]) == "--mode on the command line must be one of 0, 1; got '2'"
    assert error_of(["--device_target", "TPU"]) == (
        "--device_target on the command line must be one of Ascend, GPU, CPU, auto; got 'TPU'")
    assert parse(["--mode", "1", "--loss", "token_label"]).mode == 1


def test_config_file_errors(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert error_of(["-c", missing]) == f"config file not found: {missing}"
    assert error_of(["--config", str(tmp_path)]) == f"cannot read config file {tmp_path}: Is a directory"
    path = write(tmp_path, "lr: 0.1\nscale: [0.5, 1\n")
    assert error_of(["-c", path]).startswith(f"invalid YAML in {path} at line 3, column 1: ")
    path = write(tmp_path, "- lr\n- 0.1\n")
    assert error_of(["-c", path]) == (
        f"{path} must hold a mapping of option names to values (`key: value` lines), not a list")
    assert parse(["-c", write(tmp_path, "# nothing set yet\n")]).lr == 1.6e-3


def test_command_line_mistakes_raise_user_error():
    assert error_of(["--bach_size", "64"]) == (
        "unknown command-line option: --bach_size (did you mean --batch_size or --epoch_size or --image_resize?); "
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
        parse(["-c", write(tmp_path, "lr: 0.004\n"), "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "Train VOLO" in out and "peak learning rate (default: 0.004)" in out


@pytest.mark.parametrize("command", ["train", "validate", "infer"])
def test_help_lists_each_option_once(command, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], command)
    options = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("usage:")]  # (its prog)
    flags = [word.rstrip(",") for line in options for word in line.split() if word.startswith("-")]
    assert flags.count("-c") == 1 and flags.count("--config") == 1
    assert len(flags) == len(set(flags)), sorted(flag for flag in set(flags) if flags.count(flag) > 1)


def test_given_names_what_the_command_line_set(tmp_path):
    recipe = write(tmp_path, "model: volo_d2_224\nlr: 1e-3\n")
    config = parse_config(["-c", recipe, "--lr", "2e-3", "--num-classes", "5", "--ckpt", "x.ckpt"])
    assert config.given == {"lr", "num_classes", "ckpt_path"}  # not the recipe's model, not -c itself
    assert config.replace(model="volo_d1_224").given == config.given


def test_save_config_round_trips(tmp_path):
    recipe = write(tmp_path, "lr: 1e-3\nresume: 'no'\nauto_augment: randaug-m9-mstd0.5-inc1\n")
    config = parse_config(["-c", recipe, "--batch_size", "32", "--mean", "0.5,0.5,0.5", "--crop_pct", "0.9"])
    saved = str(tmp_path / "run" / "config.yaml")
    save_config(config, saved)
    save_config(config, saved)  # overwriting an existing file works too

    data = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text(encoding="utf-8"))
    assert list(data) == sorted(OPTIONS)
    assert os.listdir(tmp_path / "run") == ["config.yaml"]  # no temporary file left behind
    again = parse_config(["-c", saved]).as_dict()
    expected = config.as_dict()
    assert again.pop("config") == saved and expected.pop("config") == recipe
    assert again == expected


def test_mapping_option(tmp_path):
    path = write(tmp_path, "arch_overrides:\n  layers: [1, 1, 1, 1]\n  img_size: 32\n")
    assert parse(["-c", path]).arch_overrides == {"layers": [1, 1, 1, 1], "img_size": 32}
    assert parse([]).arch_overrides == {}
    # On the command line as JSON or YAML flow text.
    assert parse(["--arch_overrides", '{"layers": [2, 2, 2, 2]}']).arch_overrides == {"layers": [2, 2, 2, 2]}
    assert parse(["--arch_overrides", "{mlp_ratio: 2.0}"]).arch_overrides == {"mlp_ratio": 2.0}
    expected = "a mapping of names to values, e.g. '{a: 1, b: [2, 3]}'"
    assert error_of(["--arch_overrides", "[1, 2]"]) == (
        f"--arch_overrides on the command line must be {expected}, got '[1, 2]'")
    assert error_of(["--arch_overrides", "{a: [1"]) == (
        f"--arch_overrides on the command line must be {expected}, got '{{a: [1'")
    path = write(tmp_path, "arch_overrides: 3\n")
    assert error_of(["-c", path]) == f"arch_overrides in {path} must be {expected}, got 3"


# --- MindCV's recipe format and the one dialect of every command ---------------------------------------

def test_mindcv_recipe_is_read_with_mindcv_meanings():
    args = parse(["-c", str(FIXTURES / "mindcv_volo_d1_ascend.yaml")])
    assert (args.loss, args.model, args.cutmix_prob, args.color_jitter) == ("ce", "volo_d1", 1.0, [0.4, 0.4, 0.4])
    assert (args.val_amp_level, args.dataset_download, args.ckpt_save_policy, args.drop_overflow_update) == (
        "O3", False, "top_k", True)
    assert args.weight_decay_filter == "norm_and_bias"  # the recipe leaves it to the default


@pytest.mark.parametrize("text, name, value", [
    ("mixup_prob: 0.3\n", "cutmix_prob", 0.3),  # this project's earlier name of MindCV's cutmix_prob
    ("resume_opt: true\n", "resume", True),  # MindCV's name
    ("filter_bias_and_bn: true\n", "weight_decay_filter", "norm_and_bias"),  # the earlier MindCV name
    ("filter_bias_and_bn: false\n", "weight_decay_filter", "disable"),
    ("loss: BCE\n", "loss", "bce"), ("opt: AdamW\n", "opt", "adamw"), ("device_target: cpu\n", "device_target", "CPU"),
    ("scheduler: warmup_cosine_decay\n", "scheduler", "warmup_cosine_decay"),
    ("color_jitter: [0.1, 0.2, 0.3, 0.05]\n", "color_jitter", [0.1, 0.2, 0.3, 0.05]),
    ("re_value: random\n", "re_value", "random"), ("mode: pynative\n", "mode", 1),
    ("ckpt_save_policy: null\n", "ckpt_save_policy", None),
])
def test_both_projects_names_and_values(tmp_path, text, name, value):
    assert getattr(parse(["-c", write(tmp_path, text)]), name) == value


def test_one_option_under_two_names_is_refused(tmp_path):
    path = write(tmp_path, "mixup_prob: 0.3\ncutmix_prob: 0.5\n")
    assert error_of(["-c", path]) == (
        f"mixup_prob in {path} and cutmix_prob set the same option (cutmix_prob); give one of them")


def test_a_later_source_replaces_the_other_way_to_say_where_warmup_starts(tmp_path):
    path = write(tmp_path, "warmup_factor: 0.01\n")
    assert (parse(["-c", path]).warmup_factor, parse(["-c", path]).warmup_lr) == (0.01, None)
    args = parse(["-c", path, "--warmup_lr", "1e-5"])
    assert (args.warmup_factor, args.warmup_lr) == (None, 1e-5)
    assert error_of(["--warmup_lr", "1e-5", "--warmup_factor", "0.1"]) == (
        "warmup_factor and warmup_lr both say where warmup starts; give one of them")


@pytest.mark.parametrize("text, message", [
    ("aug_splits: 3\n", "aug_splits 3: AugMix splits feed MindCV's JSD loss, which is not supported; set aug_splits 0"),
    ("dataset: cifar10\n", "dataset 'cifar10': this project reads ImageFolder data sets"),
    ("dataset_download: true\n", "dataset_download True: downloads MindCV's built-in mnist/cifar sets"),
    ("layer_decay: 0.75\n", "layer_decay 0.75: layer-wise lr decay is not supported for VOLO"),
    ("amp_cast_list: '[nn.Conv2d]'\n", "amp_cast_list '[nn.Conv2d]': per-cell float16 lists are not supported"),
    ("aux_factor: 0.4\n", "aux_factor 0.4: VOLO's aux head is trained by loss token_label (dense_weight)"),
    ("enable_modelarts: true\n", "enable_modelarts True: ModelArts is not supported"),
    ("scheduler: one_cycle\nwarmup_epochs: 3\n", "scheduler one_cycle rises from min_lr itself: set warmup_epochs 0"),
    ("loss: token_label\nmixup: 0.8\n", "loss token_label mixes with MixToken (mix_token) instead of mixup/cutmix"),
    ("auto_augment: randomaug\n", "auto_augment 'randomaug': only RandAugment (randaug-...) is implemented with "
                                  "reproducible per-sample decisions"),
    ("auto_augment: autoaug-mstd0.5\n", "auto_augment 'autoaug-mstd0.5': only RandAugment (randaug-...)"),
    ("auto_augment: randaug-m9-x3\n", "auto_augment 'randaug-m9-x3': unknown section 'x3'; valid: m<magnitude>"),
])
def test_what_cannot_be_honoured_is_refused_with_the_reason(tmp_path, text, message):
    assert error_of(["-c", write(tmp_path, text)]).startswith(message)


@pytest.mark.parametrize("command", ["train", "validate", "infer", "convert", "export", "relabel"])
def test_every_command_takes_the_official_weights_instead_of_a_checkpoint(command):
    assert parse(["--pretrained", "True", "--model", "volo_d2"], command).pretrained is True
    assert error_of(["--pretrained", "--ckpt_path", "x.ckpt"], command) == (
        "pretrained and ckpt_path both say which weights to start from; give one of them")


def test_the_command_line_start_point_replaces_the_recipes(tmp_path):
    recipe = write(tmp_path, "ckpt_path: ./volo_d1_224.ckpt\n")  # as configs/volo_d1_finetune.yaml
    official = parse(["-c", recipe, "--pretrained", "True"])
    assert (official.pretrained, official.ckpt_path) == (True, "")
    own = parse(["-c", write(tmp_path, "pretrained: true\n", "official.yaml"), "--ckpt_path", "mine.ckpt"])
    assert (own.pretrained, own.ckpt_path) == (False, "mine.ckpt")
    assert error_of(["-c", write(tmp_path, "pretrained: true\nckpt_path: x.ckpt\n", "both.yaml")]) == (
        "pretrained and ckpt_path both say which weights to start from; give one of them")


def test_every_command_speaks_the_same_dialect():
    for command in ("validate", "infer", "convert", "export", "relabel"):
        args = parse(["--ckpt_path", "x.ckpt", "--num_classes", "7", "--arch_overrides", "{img_size: 32}"], command)
        assert (args.ckpt_path, args.num_classes, args.arch_overrides) == ("x.ckpt", 7, {"img_size": 32})
    # the spellings the README showed before keep working
    args = parse(["--teacher", "volo_d1_224", "--ckpt", "t.ckpt", "--top-k", "3", "--batch-size", "8",
                  "--arch-overrides", '{"img_size": 64}', "--mode", "graph", "--device-target", "CPU"], "relabel")
    assert (args.model, args.ckpt_path, args.top_k, args.batch_size, args.mode) == ("volo_d1_224", "t.ckpt", 3, 8, 0)
    assert args.arch_overrides == {"img_size": 64} and args.split == "train"  # relabel's own default
    assert parse(["--format", "ONNX", "--ema"], "export").file_format == "ONNX"
    assert error_of(["--lr", "0.1"], "convert").startswith("unknown command-line option: --lr")


def test_drop_rate_is_the_dropout_after_the_position_embedding(tmp_path):
    """What drop_rate's help says: the option reaches the model as the dropout right after pos_embed."""
    from conftest import tiny_volo
    from mindcv_volo.engine.model_spec import build_model, resolve

    config = parse_config(["--drop_rate", "0.25", "--arch_overrides", "{layers: [1, 1, 1, 1], img_size: 32}"])
    model = build_model(resolve(config.model, num_classes=3), config.model.drop_rate)
    assert model.pos_drop.p == 0.25 and tiny_volo().pos_drop.p == 0.0
