"""Training recipes: resolution, overrides, schedules, and the parameter group of every parameter."""

import pytest
import torch
from conftest import ALL_CONNECTIONS, assert_one_line_error, build, nano_run

from muddformer import MuddConfig
from muddformer.errors import ConfigError
from muddformer.presets import PRESET_RECIPES, PRESETS
from muddformer.training.config import TrainConfig
from muddformer.training.recipes import RECIPES, get_recipe, gradient_accumulation, param_groups
from muddformer.training.schedule import lr_at


def test_every_preset_names_a_recipe_and_the_paper_values_are_table_2s():
    assert set(PRESET_RECIPES) == set(PRESETS) and set(PRESET_RECIPES.values()) <= set(RECIPES)
    for size, lr, tokens in (
        ("405m", 3e-4, 7e9),
        ("834m", 2.5e-4, 15e9),
        ("1.4b", 2e-4, 26e9),
        ("deepnarrow-797m", 2.5e-4, 15e9),
        ("deepnarrow-1.34b", 2e-4, 26e9),
        ("moe-1.8b-a405m", 3e-4, 26e9),
    ):
        r = get_recipe(PRESET_RECIPES[f"muddformer-{size}"])
        # Table 2's tokens in 256 x 2048-token steps (405M: the official configuration's 13,500 steps, 7.08B)
        assert r.max_steps == (13_500 if size == "405m" else int(tokens / (256 * 2048)))
        assert r.weight_decay_on == "all"  # the official JAX code's AdamW decays every parameter
        assert (
            r.lr,
            r.beta1,
            r.beta2,
            r.weight_decay,
            r.grad_clip,
            r.warmup,
            r.schedule,
            r.min_lr_ratio,
            r.seq_len,
        ) == (lr, 0.9, 0.95, 0.1, 1.0, 0.01, "cosine", 0.1, 2048)
        assert PRESET_RECIPES[f"tfm++-{size}"] == PRESET_RECIPES[f"muddformer-{size}"]
        assert MuddConfig.from_preset(f"muddformer-{size}").dense_norm == "prepost"  # the official configuration
        assert MuddConfig.from_preset(f"tfm++-{size}").init_method == "xavier"  # the paper's scaling runs
    m28 = get_recipe(PRESET_RECIPES["muddformer-2.8b"])
    assert m28.lr * m28.min_lr_ratio == pytest.approx(3.2e-6)
    assert get_recipe(PRESET_RECIPES["muddpythia-2.8b"]).lr == 1.6e-4
    assert PRESET_RECIPES["tiny"] == PRESET_RECIPES["tfm++-tiny"] == "cpu"
    assert get_recipe("cpu").max_steps == 450 and get_recipe("pythia-1.4b").max_steps == 143_000


def test_the_run_length_is_the_recipes_unless_given():
    assert TrainConfig(preset="muddformer-405m").resolved()[0].max_steps == 13_500
    assert TrainConfig(preset="muddformer-405m", max_steps=20).resolved()[0].max_steps == 20
    assert TrainConfig(preset="tiny").resolved()[0].max_steps == 450


@pytest.mark.parametrize("scope, vectors_decayed", [("matrices", False), ("all", True)])
def test_weight_decay_on_matrices_or_on_every_parameter(scope, vectors_decayed):
    model = build(connection="mudd", dense_norm="prepost")
    groups = {g["name"]: g for g in param_groups(model, get_recipe("cpu").replace(weight_decay_on=scope))}
    assert set(groups) == {"matrices", "vectors", "generator_matrices", "generator_vectors", "priors"}
    assert groups["matrices"]["weight_decay"] == groups["generator_matrices"]["weight_decay"] == 0.1
    for name in ("vectors", "generator_vectors", "priors"):
        assert groups[name]["weight_decay"] == (0.1 if vectors_decayed else 0.0), name
    with pytest.raises(ConfigError, match="--weight-decay-on must be one of matrices, all, got 'norms'"):
        TrainConfig(weight_decay_on="norms").resolved()


def test_overrides_replace_recipe_fields_and_the_rest_is_the_recipes():
    tc, recipe = TrainConfig(preset="muddformer-405m", lr=1e-4, generator_lr_mult=0.25, dtype="float32").resolved()
    assert (recipe.name, recipe.lr, recipe.generator_lr_mult, recipe.dtype, recipe.seq_len) == (
        "paper-405m",
        1e-4,
        0.25,
        "float32",
        2048,
    )
    assert (tc.recipe, tc.lr, tc.generator_lr_mult, tc.beta2, tc.seq_len) == ("paper-405m", 1e-4, 0.25, 0.95, 2048)
    tc, recipe = TrainConfig(preset="tiny", recipe="paper-834m").resolved()
    assert recipe.name == "paper-834m" and tc.lr == 2.5e-4
    with pytest.raises(ConfigError, match=r"unknown recipe 'paper-405'.*did you mean paper-405m"):
        TrainConfig(recipe="paper-405").resolved()
    with pytest.raises(ConfigError, match="--generator-beta2 must be in"):
        TrainConfig(generator_beta2=1.0).resolved()


def test_global_batch_sets_gradient_accumulation():
    paper = get_recipe("paper-405m")
    assert paper.global_batch * paper.seq_len == 524288  # the paper's 0.5M-token batches
    assert gradient_accumulation(paper, world=4) == 8 and gradient_accumulation(paper.replace(batch_size=16), 16) == 1
    assert gradient_accumulation(get_recipe("cpu"), world=2) == 1
    with pytest.raises(ConfigError, match="--global-batch 256 is not a multiple of --batch-size 6 x 1"):
        gradient_accumulation(paper.replace(batch_size=6), world=1)


@pytest.mark.parametrize(
    "schedule, halfway, end", [("cosine", 0.55, 0.1), ("linear", 0.55, 0.1), ("constant", 1.0, 1.0)]
)
def test_schedules(schedule, halfway, end):
    tc, _ = TrainConfig(max_steps=1001, lr=1.0, warmup=0.001, schedule=schedule).resolved()
    assert lr_at(0, tc) == 1.0  # one warm-up step
    assert lr_at(501, tc) == pytest.approx(halfway, abs=1e-3)
    assert lr_at(1001, tc) == pytest.approx(end)


@pytest.mark.parametrize("connection", ALL_CONNECTIONS)
def test_every_parameter_of_every_connection_is_in_exactly_one_group(connection):
    model = build(connection=connection, n_layer=3)
    recipe = get_recipe("cpu").replace(
        generator_lr_mult=0.25, generator_beta2=0.99, generator_weight_decay=0.0, generator_eps=1e-10, prior_lr_mult=0.5
    )
    groups = param_groups(model, recipe)
    names = {id(p): n for n, p in model.named_parameters()}
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(names.values())  # each once, none left out
    role = {names[id(p)]: g for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        g = role[name]
        if not name.startswith("connection."):
            assert g["name"] == ("matrices" if p.dim() >= 2 else "vectors") and g["lr_mult"] == 1.0
            assert g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8
        elif name in {"connection." + n for n in model.connection.static_prior_names()}:
            assert (g["name"], g["lr_mult"], g["weight_decay"], g["betas"]) == ("priors", 0.5, 0.0, (0.9, 0.99))
            assert g["eps"] == 1e-10
        else:
            assert g["name"].startswith("generator_") and g["lr_mult"] == 0.25 and g["weight_decay"] == 0.0
            assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-10
    if connection in ("mudd", "ddformer", "denseformer", "mudd-static"):
        assert {n for n, g in role.items() if g["name"] == "priors"} == {f"connection.dense_bs.{l}" for l in range(3)}
    if connection == "residual":
        assert {g["name"] for g in groups} == {"matrices", "vectors"}


def test_generator_learning_rate_multiplier_reaches_the_optimizer(play_data, tmp_path):
    from muddformer.training.trainer import train

    out = tmp_path / "run"
    train(nano_run(play_data, out, generator_lr_mult=0.25, generator_eps=1e-10))
    state = torch.load(out / "checkpoints" / "step_000002" / "optimizer.pt", weights_only=False)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["generator_matrices"]["lr"] == pytest.approx(0.25 * groups["matrices"]["lr"])
    assert groups["generator_matrices"]["eps"] == 1e-10 and groups["matrices"]["eps"] == 1e-8
    import json

    run = json.loads((out / "run.json").read_text())
    assert run["recipe"]["name"] == "cpu" and run["recipe"]["generator_lr_mult"] == 0.25


def test_recipes_command_and_unknown_recipe(run_cli, play_data, tmp_path):
    proc = run_cli("recipes")
    assert proc.returncode == 0 and "paper-405m" in proc.stdout and "cpu" in proc.stdout
    assert "default of: tfm++-405m, muddformer-405m" in proc.stdout
    # The batch of a step, not only the micro-batch, and the connection's own settings.
    assert "13,500 steps" in proc.stdout and "batch: 256 sequences of 2048 tokens a step, 8 per rank" in proc.stdout
    assert "connection's parameters: lr x0.25, betas (0.9, 0.99), eps 1e-10, wd 0; priors lr x0.25" in proc.stdout
    assert "connection's parameters: lr x1, betas (0.9, 0.95), eps 1e-08, wd 0.1; priors lr x1" in proc.stdout
    assert_one_line_error(
        run_cli("train", "--recipe", "fast", "--data", play_data, "--out", tmp_path / "r"), "unknown recipe 'fast'"
    )
    assert not (tmp_path / "r").exists()
