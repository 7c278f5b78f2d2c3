import argparse

import pytest

from app.core.config import Config, ConfigError, add_arguments, config_from_args, load_config


def parse(argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_valid_and_printed():
    cfg = load_config()
    assert cfg.data.dataset == "movielens-small"
    assert abs(cfg.data.train_fraction - 0.7) < 1e-9
    assert "data.label_threshold = 4.0" in cfg.describe(everything=True)


def test_yaml_then_flags_override(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  split: temporal\n  label_threshold: 3.5\ntrain:\n  epochs: 7\n")
    cfg = parse(["--config", str(f), "--label-threshold", "4.5", "--eval-k", "5,10"])
    assert cfg.data.split == "temporal"
    assert cfg.data.label_threshold == 4.5  # the flag wins over the file
    assert cfg.train.epochs == 7
    assert cfg.train.eval_k == [5, 10]


def test_saved_yaml_round_trips(tmp_path):
    cfg = parse(["--dataset", "synthetic", "--rows", "1000", "--no-overwrite"])
    cfg.dump_yaml(tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("argv, message", [
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--val-fraction", "0.6", "--test-fraction", "0.5"], "--test-fraction plus --val-fraction"),
    (["--rows", "many"], "--rows expects int"),
    (["--dataset", "csv"], "--input is required with --dataset csv"),
    (["--rating-min", "5", "--rating-max", "1"], "--rating-min must be below --rating-max"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--epochs", "1e-3"], "--epochs expects int, got '1e-3'"),
    (["--embedding-lr", "inf"], "--embedding-lr must be a finite number, got 'inf'"),
    (["--label-threshold", "nan"], "--label-threshold must be a finite number, got 'nan'"),
    (["--batch-wait-ms", "5000"], "--batch-wait-ms must be in [0, 1,000] ms, got 5000.0"),
    (["--lease-timeout", "1e6"], "--lease-timeout must be in (0, 86,400] seconds"),
    (["--eval-k", "10,nan"], "--eval-k must hold finite numbers, got '10,nan'"),
    (["--catalog-max-logits", "-1"], "--catalog-max-logits must be in [0, 1e11]"),
    (["--warm-lr-scale", "0"], "--warm-lr-scale must be in (0, 1], got 0"),
    (["--warm-lr-scale", "2"], "--warm-lr-scale must be in (0, 1], got 2"),
])
def test_invalid_values_name_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")
                       .replace("(", r"\(")):
        parse(argv)


def test_unknown_yaml_keys_are_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  splitt: random\n")
    with pytest.raises(ConfigError, match="unknown setting data.splitt"):
        load_config(str(f))
    f.write_text("dataa: {}\n")
    with pytest.raises(ConfigError, match="unknown section 'dataa'"):
        load_config(str(f))


def test_field_names_are_unique_flags():
    # every field is reachable as a flag; a duplicate name would make one unreachable
    names = [f for s in vars(Config()).values() for f in vars(s)]
    assert len(names) == len(set(names))


def test_describe_prints_only_what_differs_from_the_defaults():
    assert load_config().describe() == "config: the defaults"
    assert parse(["--epochs", "7", "--split", "temporal"]).describe() == \
        'config (differences from the defaults): data.split = "temporal", train.epochs = 7'
    assert len(load_config().describe(everything=True).splitlines()) > 80


def test_a_renamed_setting_names_its_new_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  top_k: [5]\n")
    with pytest.raises(ConfigError, match=r"unknown setting train.top_k \(renamed train.eval_k\)"):
        load_config(str(f))


def test_an_enumerated_value_from_a_file_is_checked_too():
    with pytest.raises(ConfigError, match="--dataset must be one of movielens-small"):
        load_config(overrides={"dataset": "excel"})


def test_a_config_round_trips_through_its_dict_and_unknown_settings_are_refused():
    from app.core.config import Config

    cfg = load_config(overrides={"epochs": 3, "label_threshold": 3.5, "tower_layers": "32,16"})
    again = Config.from_dict(cfg.to_dict(), {"embedding_dim": 16})
    assert again.train.epochs == 3 and again.data.label_threshold == 3.5
    assert list(again.model.tower_layers) == [32, 16] and again.model.embedding_dim == 16
    assert Config.from_dict(again.to_dict()) == again
    with pytest.raises(ConfigError, match="unknown setting train.nope"):
        Config.from_dict({"train": {"nope": 1}})
    with pytest.raises(ConfigError, match="--epochs"):
        Config.from_dict({"train": {"epochs": "many"}})


def test_a_yaml_boolean_is_not_a_number(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: true\n")
    with pytest.raises(ConfigError, match="--epochs expects int, got True"):
        load_config(str(f))


def test_auto_negatives_take_a_full_softmax_only_while_it_is_cheap():
    m = load_config().model
    assert m.negatives == "auto"
    # movielens-small: 9k items x 80k training rows (7e8 logits an epoch) keeps the full softmax
    assert m.resolved_negatives(9_067, 80_000) == "catalog"
    # 1M synthetic rows: 5k items x 670k rows (3e9) is mixed, as is any catalog above the limit
    assert m.resolved_negatives(5_001, 670_000) == "mixed"
    assert m.resolved_negatives(20_001, 1_000) == "mixed"
    bigger = load_config(overrides={"catalog_max_logits": 1e10}).model
    assert bigger.resolved_negatives(5_001, 670_000) == "catalog"
    for pinned in ("catalog", "mixed", "in_batch"):
        cfg = load_config(overrides={"negatives": pinned}).model
        assert cfg.resolved_negatives(50_001, 10_000_000) == pinned
