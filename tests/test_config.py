"""Recipe schema: YAML loading, base overlays, `a.b=c` overrides and validation messages."""

from __future__ import annotations

import pytest

from ssa_megatron.config import RecipeConfig, SSAConfig, apply_overrides, load_recipe, ssa_config_from_dict, to_dict


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_yaml_base_overlay_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", "name: base\nmodel: {num_layers: 4, seq_length: 128}\nssa: {top_k: 8}\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\nssa: {alpha: 0.0, p_full: 1.0}\n")
    cfg = load_recipe(child, ["ssa.top_k=4", "optim.betas=[0.9, 0.99]", "train.steps=7"])
    assert cfg.name == "child"
    assert cfg.model.num_layers == 4 and cfg.model.seq_length == 128
    assert cfg.ssa.top_k == 4 and cfg.ssa.alpha == 0.0 and cfg.ssa.p_full == 1.0
    assert cfg.optim.betas == (0.9, 0.99) and cfg.train.steps == 7
    assert isinstance(cfg.ssa.alpha, float)


def test_round_trip_through_dict():
    cfg = RecipeConfig()
    again = load_from_dict(to_dict(cfg))
    assert again == cfg


def load_from_dict(data):
    from ssa_megatron.config import from_dict
    return from_dict(RecipeConfig, data)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ssa.block_size=24", r"ssa.block_size=24: must be a power of two >= 16"),
        ("ssa.block_size=8", r"ssa.block_size=8: must be a power of two >= 16"),
        ("ssa.top_k=0", r"ssa.top_k=0: the budget must be at least 1 block"),
        ("ssa.p_full=1.5", r"ssa.p_full=1.5: must be in \[0, 1\]"),
        ("ssa.score=l2", r"ssa.score='l2': must be one of 'group_softmax', 'dot'"),
        ("ssa.gate=per_token", r"ssa.gate='per_token': must be one of 'per_head', 'none'"),
        ("ssa.sink_blocks=20", r"exceeds the budget top_k=16"),
        ("ssa.topk=3", r"unknown key 'ssa.topk'; allowed: .*top_k"),
        ("bogus=1", r"unknown key 'bogus'"),
        ("model.num_layers=two", r"model.num_layers='two': expected an integer"),
        ("ssa.document_mask=1", r"ssa.document_mask=1: expected true or false"),
        ("model.seq_length=100", r"model.seq_length=100: must be a multiple of"),
        ("parallel.tensor_parallel=4", r"parallel.tensor_parallel=4 must divide model.num_query_groups=2"),
        ("ssa", r"override 'ssa': expected the form section.key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(tmp_path, override, message):
    recipe = write(tmp_path, "r.yaml", "name: r\n")
    with pytest.raises(ValueError, match=message):
        load_recipe(recipe, [override])


def test_missing_recipe_is_a_clear_error():
    with pytest.raises(ValueError, match=r"recipe 'no_such_recipe'"):
        load_recipe("no_such_recipe")


def test_ssa_config_from_dict_and_inference_view():
    cfg = ssa_config_from_dict({"block_size": 32, "top_k": 4, "inference_top_k": 64})
    assert cfg.receptive_field == 128
    inf = cfg.for_inference()
    assert inf.top_k == 64 and inf.block_size == 32 and inf.receptive_field == 2048
    assert SSAConfig().for_inference() == SSAConfig()


def test_overrides_do_not_mutate_input():
    data = {"ssa": {"top_k": 2}}
    out = apply_overrides(data, ["ssa.top_k=3"])
    assert data == {"ssa": {"top_k": 2}} and out["ssa"]["top_k"] == 3


# ------------------------------------------------------------------------------------------ numbers

@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("1.5e+2", 150.0), ("2e2", 200.0),
                                         ("-1e-1", -0.1), (".5e1", 5.0), ("0.001", 0.001), ("1", 1.0)])
def test_exponent_numbers_parse_as_numbers_in_overrides_and_files(tmp_path, text, value):
    """PyYAML (YAML 1.1) reads 1e-3 as a string; recipes and overrides read it as YAML 1.2 does."""
    cfg = load_recipe(write(tmp_path, "r.yaml", f"name: r\nmodel: {{init_std: {text}}}\n"))
    assert cfg.model.init_std == value and isinstance(cfg.model.init_std, float)
    data = apply_overrides({}, [f"optim.eps={text}"])
    assert data["optim"]["eps"] == value


def test_integral_exponent_numbers_fill_integer_fields(tmp_path):
    cfg = load_recipe(write(tmp_path, "r.yaml", "name: r\n"), ["train.steps=1e3"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    with pytest.raises(ValueError, match=r"train.steps=1500.5: expected an integer"):
        load_recipe(write(tmp_path, "r.yaml", "name: r\n"), ["train.steps=1.5005e3"])


def test_exponent_strings_stay_strings_where_quoted():
    assert apply_overrides({}, ["name='1e3'"])["name"] == "1e3"


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr=nan"),        # names lr, not min_lr (NaN compares false)
    ("optim.lr=.inf", "optim.lr=inf"),
    ("optim.min_lr=-.inf", "optim.min_lr=-inf"),
    ("ssa.alpha=.inf", "ssa.alpha=inf"),
    ("ssa.alpha=.nan", "ssa.alpha=nan"),
    ("ssa.p_full=.nan", "ssa.p_full=nan"),
    ("optim.betas=[0.9,.nan]", "optim.betas[1]=nan"),
    ("data.builtin_max_mb=.inf", "data.builtin_max_mb=inf"),
    ("model.rope_theta=.inf", "model.rope_theta=inf"),
])
def test_nan_and_infinity_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ValueError) as err:
        load_recipe(write(tmp_path, "r.yaml", "name: r\n"), [override])
    message = str(err.value)
    assert message.startswith(key + ":") and "finite" in message and "\n" not in message


def test_validate_refuses_non_finite_values_set_in_code():
    with pytest.raises(ValueError, match=r"^ssa.alpha=inf: must be a finite number"):
        SSAConfig(alpha=float("inf")).validate()
    cfg = RecipeConfig()
    cfg.optim.lr = float("nan")
    with pytest.raises(ValueError, match=r"^optim.lr=nan: must be a finite number"):
        cfg.validate()


def test_yaml_syntax_errors_are_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        load_recipe(write(tmp_path, "r.yaml", "name: r\n"), ["optim.betas=[0.9"])
    assert str(err.value).startswith("override 'optim.betas=[0.9': not valid YAML") and "\n" not in str(err.value)
    bad = write(tmp_path, "bad.yaml", "name: r\nssa: {top_k: 4\n")
    with pytest.raises(ValueError) as err:
        load_recipe(bad)
    assert f"recipe {str(bad)!r}: not valid YAML" in str(err.value) and "line 3" in str(err.value)
    assert "\n" not in str(err.value)
