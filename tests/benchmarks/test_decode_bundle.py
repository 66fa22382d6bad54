"""benchmarks/decode.py --bundle measures the bundle's own model on its own catalogue, and every
decode and load result says which model it measured (benchmarks.common.model_info)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

from benchmarks import decode, load
from benchmarks.common import model_info
from tests.bundlefactory import make_tiny_bundle
from training.config import PROFILES


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Manifest config {"profile": "test"}, a random 32-d 2-layer Llama, 3 levels x 16 codes.
    return make_tiny_bundle(tmp_path_factory.mktemp("bundle") / "tiny", n_items=200, seed=0)


def test_decode_bundle_run_measures_the_bundles_model_and_catalogue(
    bundle: Path, tmp_path: Path
) -> None:
    decode.main(
        [
            "--bundle", str(bundle),
            "--engines", "reference,torch",
            "--dtypes", "float32",
            "--batches", "1,4", "--n-batches", "2",
            "--ref-batches", "1,4", "--ref-n-batches", "2",
            "--beam", "8",
            "--memory-batches", "0",
            "--paired-rounds", "1",
            "--threads", "1",
            "--out", "decode-test",
            "--results", str(tmp_path),
        ]
    )  # fmt: skip
    out = json.loads((tmp_path / "decode-test.json").read_text())
    assert out["model_profile"] == "test"  # what the tiny bundle's manifest says
    assert out["weights"] == "unknown"  # make_tiny_bundle leaves no training record
    assert out["model"]["bundle"] == str(bundle)
    assert (out["model"]["hidden"], out["model"]["layers"]) == (32, 2)
    # The bundle's catalogue (200 items), not the random 20k/200k/1M ones.
    assert {r["items"] for r in out["rows"]} == {200}
    assert out["trie"]["items"] == 200 and out["paired"]["items"] == 200
    assert out["prompt"] == {"history_items": 20, "tokens": 1 + 20 * 3}
    got = sorted((r["engine"], r["batch"]) for r in out["rows"])
    assert got == [("reference", 1), ("reference", 4), ("torch", 1), ("torch", 4)]
    assert all(r["model"] == "test llama-32d-2L" for r in out["rows"])
    # Exactness against the reference, on the bundle's model and trie.
    for row in out["rows"]:
        if row["engine"] == "torch":
            assert row["identical_to_reference"] is True
    assert out["identical_to_reference"] is True
    assert out["paired"]["identical_to_reference"] is True
    assert 0.0 <= out["max_score_diff"] < 1e-3
    assert out["memory"] is None
    md = (tmp_path / "decode-test.md").read_text()
    assert f"- model: profile test, unknown weights, hidden 32, 2 layers, bundle `{bundle}`" in md
    assert "whole catalogue (200 items; --items does not apply)" in md
    assert "prompts of 61 tokens (20 history items)" in md


def test_decode_random_model_is_labelled_random(tmp_path: Path) -> None:
    decode.main(
        [
            "--engines", "torch", "--dtypes", "float32", "--items", "500",
            "--hidden", "32", "--layers", "2", "--heads", "2",
            "--batches", "2", "--n-batches", "1", "--memory-batches", "0",
            "--threads", "1", "--out", "decode-random", "--results", str(tmp_path),
        ]
    )  # fmt: skip
    out = json.loads((tmp_path / "decode-random.json").read_text())
    assert (out["model_profile"], out["weights"]) == ("random", "random")
    assert out["model"]["bundle"] is None and out["model"]["hidden"] == 32
    assert out["identical_to_reference"] is None  # nothing compared: no headline
    assert out["machine"]["cpu_flags"] is not None
    md = (tmp_path / "decode-random.md").read_text()
    assert "- model: profile random, random weights, hidden 32, 2 layers, no bundle" in md
    assert "CPU flags: " in md


def test_decode_bundle_refuses_the_random_models_options(bundle: Path) -> None:
    with pytest.raises(SystemExit):
        decode.parse_args(["--bundle", str(bundle), "--items", "1000"])
    with pytest.raises(SystemExit):
        decode.parse_args(["--bundle", str(bundle), "--hidden", "256"])
    args = decode.parse_args(["--bundle", str(bundle)])
    assert args.items is None and args.hidden is None
    assert decode.parse_args([]).items == [20_000, 200_000, 1_000_000]


def _copy_with(bundle: Path, dest: Path, config: dict, lm_shape: dict | None = None) -> Path:
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["config"] = config
    (dest / "manifest.json").write_text(json.dumps(manifest))
    if lm_shape is not None:
        cfg = json.loads((dest / "lm" / "config.json").read_text())
        cfg.update(lm_shape)
        (dest / "lm" / "config.json").write_text(json.dumps(cfg))
    return dest


def test_model_info_reads_the_profile_from_the_manifest_config(
    bundle: Path, tmp_path: Path
) -> None:
    quick = PROFILES["quick"].with_device("cpu").to_dict()
    info = model_info(_copy_with(bundle, tmp_path / "quick", quick))
    assert info["model_profile"] == "quick"
    assert info["model"]["profile_from"] == "manifest config equals the profile"

    # An experiment file (the config differs) with the full profile's recommender shape.
    full = PROFILES["full"].with_device("cuda").to_dict()
    full["lm"]["lr"] = 1e-3
    full_shape = {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 1024,
    }
    info = model_info(_copy_with(bundle, tmp_path / "full", full, full_shape))
    assert info["model_profile"] == "full"
    assert info["model"]["profile_from"].startswith("model shape")
    assert (info["model"]["hidden"], info["model"]["intermediate"]) == (256, 1024)

    # Neither the config nor the shape (32-d) is a profile's.
    info = model_info(_copy_with(bundle, tmp_path / "other", full))
    assert info["model_profile"] == "custom"


def test_model_info_calls_weights_trained_only_on_a_training_record(
    bundle: Path, tmp_path: Path
) -> None:
    assert model_info(bundle)["weights"] == "unknown"
    trained = shutil.copytree(bundle, tmp_path / "trained")
    (trained / "lm" / "letterrec.json").write_text(json.dumps({"train": {"epochs": 1}}))
    info = model_info(trained)
    assert (info["weights"], info["model"]["weights_from"]) == ("trained", "lm/letterrec.json")
    reported = shutil.copytree(bundle, tmp_path / "reported")
    (reported / "report").mkdir(exist_ok=True)
    (reported / "report" / "lm.json").write_text("{}")
    assert model_info(reported)["weights"] == "trained"


def test_load_report_says_which_model_the_bundle_holds(bundle: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(
        bundle=bundle, url="http://x", client="httpx", k=10, history_len=20, duration=1.0,
        requests=10,
    )  # fmt: skip
    rows = [load.Row(32, 10, 120.0, 20.0, 40.0, 0)]
    server = {"engine": "torch", "device": "cpu", "catalogue_items": 200}
    report = load.make_report(args, server, rows, (0.0, 0.0, 0.0))
    assert (report["model_profile"], report["weights"]) == ("test", "unknown")
    assert report["model"]["bundle"] == str(bundle) and report["model"]["layers"] == 2
    path = load.write(report, tmp_path, "test")
    assert json.loads(path.read_text())["model_profile"] == "test"
    md = path.with_suffix(".md").read_text()
    assert f"- model: profile test, unknown weights, hidden 32, 2 layers, bundle `{bundle}`" in md
