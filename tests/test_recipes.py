"""Recipe files (ghostvis/recipes.py): TOML flags for launch/train.py, the resolved run_config.toml, key errors."""

from __future__ import annotations

import pytest
from conftest import REPO, losses, train_args, train_cli

from ghostvis import recipes
from ghostvis.cli import UserError
from ghostvis.shipped import shipped_dir
from ghostvis.train import loop
from ghostvis.train.stages import ALL_LAYERS


def test_run_config_reruns_the_same_run(tmp_path, text_data, tiny_tokenizer_dir, world1):
    parser = train_cli().build_parser()
    first = tmp_path / "first"
    args, argv = recipes.parse_args(parser, [str(a) for a in train_args(
        text_data, tiny_tokenizer_dir, first, "zero1.json", "--steps", "4", "--save-every", "0", "--seed", "3")])
    path = recipes.write_resolved(parser, argv, first)
    loop.run(args)
    again, _ = recipes.parse_args(parser, ["--config", str(path), "--out", str(tmp_path / "again")])
    assert {**vars(again), "out": None, "config": None} == {**vars(args), "out": None}
    loop.run(again)
    assert losses(tmp_path / "again") == losses(first) and len(losses(first)) == 4


def test_flags_override_recipe_and_converted_values_round_trip(tmp_path):
    parser = train_cli().build_parser()
    recipe = tmp_path / "r.toml"
    recipe.write_text('stage = "sft"\nmicro_batch = 3\ntrain-llm-layers = "all"\nfreeze = "encoder,connector"\n'
                      'compile = true\nactivation-checkpointing = 2\nlr = 1e-5\ndata = "d"\nout = "o"\n'
                      'vision = ["resampler=pixel_shuffle", "feature_norm=true"]\n')
    args, argv = recipes.parse_args(parser, ["--config", str(recipe), "--micro-batch", "5"])
    assert (args.stage, args.micro_batch, args.train_llm_layers, args.freeze, args.compile,
            args.activation_checkpointing, args.lr) == ("sft", 5, ALL_LAYERS, ("encoder", "connector"), True, 2, 1e-5)
    assert args.vision == [("resampler", "pixel_shuffle"), ("feature_norm", True)]
    resolved = recipes.write_resolved(parser, argv, tmp_path / "run")
    again, _ = recipes.parse_args(parser, ["--config", str(resolved)])
    assert {**vars(again), "config": None} == {**vars(args), "config": None}


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "recipes").glob("*.toml")))
def test_shipped_recipes_parse(name):
    assert shipped_dir("recipes") == REPO / "recipes"
    args, _ = recipes.parse_args(train_cli().build_parser(), ["--config", name, "--data", "d", "--out", "o"])
    assert args.stage in name and (REPO / args.ds_config).is_file()


@pytest.mark.parametrize("text, message", [
    ("micro-bach = 4\n", "unknown key 'micro-bach'; did you mean 'micro-batch'?"),
    ("[steps]\nn = 1\n", "key 'steps' holds a table"),
    ("compile = 1\n", "key 'compile' is a switch"),
    ("steps = \n", "not valid TOML"),
])
def test_bad_recipe_is_one_line_error(tmp_path, capsys, text, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(text)
    # a UserError: the command prints it as its one `error:` line (run_main), with no usage block before it
    with pytest.raises(UserError) as err:
        recipes.parse_args(train_cli().build_parser(), ["--config", str(recipe), "--data", "d", "--out", "o"])
    assert str(err.value).startswith(f"{recipe}: ") and message in str(err.value) and "\n" not in str(err.value)
    assert capsys.readouterr().err == ""


def test_missing_recipe_lists_shipped(capsys):
    with pytest.raises(recipes.RecipeError, match=r"no such file, nor a shipped recipe \(shipped: demo_base"):
        recipes.parse_args(train_cli().build_parser(), ["--config", "nope", "--data", "d", "--out", "o"])
