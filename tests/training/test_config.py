import json
from pathlib import Path

import pytest

from training.config import PROFILES, PipelineConfig, get_profile, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "configs").glob("*.json")))
def test_experiment_files_parse_into_typed_configs(path: Path) -> None:
    raw = json.loads(path.read_text())
    cfg = load_config(path)

    def check(obj: object, values: dict, where: str) -> None:
        for key, value in values.items():
            got = getattr(obj, key)
            if isinstance(value, dict):
                check(got, value, f"{where}.{key}")
            else:
                assert got == (tuple(value) if isinstance(got, tuple) else value), f"{where}.{key}"

    check(cfg, raw, path.name)
    # An experiment file names every field the profiles set, so it means one experiment
    # whichever profile it is applied over.
    for name in PROFILES:
        assert load_config(path, get_profile(name)) == cfg, name


def test_a_config_file_applies_over_the_profile_field_by_field(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"lm": {"code_smoothing": 0.1, "model": {"layers": 2}}}))
    quick = get_profile("quick")
    cfg = resolve_config("quick", path)
    assert cfg.lm.code_smoothing == 0.1 and cfg.lm.model.layers == 2
    # Everything else is the profile's, not the dataclass defaults'.
    assert cfg.lm.epochs == quick.lm.epochs != PipelineConfig().lm.epochs
    assert cfg.lm.model.hidden == quick.lm.model.hidden
    assert cfg.tokenizer == quick.tokenizer and cfg.ablation is quick.ablation is False
    assert resolve_config("quick", None) == quick
    full = resolve_config("full", path)
    assert full.lm.model.hidden == 256 and full.lm.distill == 0.5 and full.lm.code_smoothing == 0.1


def test_a_section_must_be_an_object(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"lm": 3}))
    with pytest.raises(ValueError, match=r"exp.json: PipelineConfig.lm: expected an object"):
        load_config(path, get_profile("full"))
    path.write_text("[1]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load_config(path)


def test_unknown_fields_are_errors_naming_the_field(tmp_path):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({"lm": {"model": {"hiden": 64}}}))
    with pytest.raises(ValueError, match=r"RecommenderConfig: unknown field\(s\) \['hiden'\]"):
        load_config(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="invalid JSON at line 1"):
        load_config(path)


def test_profiles_registry():
    assert set(PROFILES) == {"full", "quick"}
    with pytest.raises(ValueError, match="unknown profile 'x'; valid: \\['full', 'quick'\\]"):
        get_profile("x")
    assert get_profile("quick").with_device("cuda").lm.device == "cuda"


def test_the_full_profile_is_the_recipe_it_names() -> None:
    from training.config import FULL_RECIPE

    path = ROOT / "benchmarks" / "configs" / f"{FULL_RECIPE}.json"
    assert get_profile("full") == load_config(path)
