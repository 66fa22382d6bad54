"""The repeat-aware mode over real HTTP: a bundle whose manifest holds a fitted prior and the
'repeat' default; exact scores; explicit options win over the default; contradictions are a
422 that names the field; the plain answer is unchanged when the mode is off."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from transformers import AutoModelForCausalLM

from models.bundle import Bundle
from models.repeat import RepeatPrior, identifier_log_probs
from tests.service.conftest import AUTH, LiveServer, live_server, service_settings

PRIOR = RepeatPrior(bias=2.0, recency=-0.5, frequency=1.0)
NEW_ITEM_BONUS = 300.0


@pytest.fixture(scope="module")
def repeat_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repeat") / "bundle"
    shutil.copytree(tiny_bundle, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["recommend"] = {
        "mode": "repeat",
        "repeat_prior": PRIOR.to_dict(),
        "new_item_bonus": NEW_ITEM_BONUS,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module", params=[False, True], ids=["in-process", "decode-process"])
def server(repeat_bundle: Path, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    with live_server(service_settings(repeat_bundle, decode_process=request.param)) as srv:
        yield srv


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def post(client: httpx.Client, **body: object) -> dict:
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_default_mode_is_the_manifests_and_history_items_score_exactly(
    client: httpx.Client, repeat_bundle: Path
) -> None:
    bundle = Bundle.load(repeat_bundle)
    history = [bundle.catalogue.item_ids[i] for i in (4, 9, 4, 17)]
    body = post(client, history=history, k=30)
    assert body["mode"] == "repeat"
    returned = {it["item_id"]: it for it in body["items"]}
    # With a +2 bias every recent item makes the top 30 of a 200-item catalogue here.
    assert {"item-4", "item-9", "item-17"} <= set(returned)
    model = AutoModelForCausalLM.from_pretrained(bundle.lm_dir).eval()
    rows = [4, 9, 4, 17]
    prompt = bundle.vocab.prompt(bundle.catalogue.codes[rows])
    cand = bundle.catalogue.codes[[17, 4, 9]][None]  # newest first: 17, 4, 9
    lp = identifier_log_probs(model, [prompt], cand, bundle.vocab)[0].numpy()
    # Newest-first positions of the distinct items: 17 -> 1, 4 -> 2, 9 -> 3; item 4 twice.
    prior = PRIOR.of(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 1.0]))
    for item, want in zip(["item-17", "item-4", "item-9"], lp + prior, strict=True):
        assert returned[item]["from_history"]
        assert returned[item]["score"] == pytest.approx(float(want), abs=1e-4)
    scores = [it["score"] for it in body["items"]]
    assert scores == sorted(scores, reverse=True)


def test_repeat_off_answers_as_the_plain_beam(client: httpx.Client) -> None:
    history = ["item-4", "item-9"]
    off = post(client, history=history, k=10, repeat=False)
    plain = post(client, history=history, k=10, exclude_history=False)
    assert off["mode"] == plain["mode"] == "plain"
    assert off["items"] == plain["items"]
    assert not any(it["from_history"] for it in off["items"])
    excluded = post(client, history=history, k=10, exclude_history=True)
    assert excluded["mode"] == "exclude_history"
    assert not {"item-4", "item-9"} & {it["item_id"] for it in excluded["items"]}


def test_contradictory_options_are_a_422_naming_the_field(client: httpx.Client) -> None:
    r = client.post(
        "/recommend", json={"history": ["item-1"], "repeat": True, "exclude_history": True}
    )
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "repeat"]
    batch = {"requests": [{"history": ["item-1"]}, {"repeat": True, "exclude_history": True}]}
    r = client.post("/recommend/batch", json=batch)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "requests", "1", "repeat"]


def test_batch_mixes_modes_and_each_answer_matches_its_single_request(
    client: httpx.Client,
) -> None:
    reqs = [
        {"history": ["item-4", "item-9"], "k": 5},
        {"history": ["item-4", "item-9"], "k": 5, "repeat": False},
        {"history": ["item-3"], "k": 5, "exclude_history": True},
    ]
    r = client.post("/recommend/batch", json={"requests": reqs})
    assert r.status_code == 200, r.text
    for got, req in zip(r.json()["responses"], reqs, strict=True):
        single = post(client, **req)
        assert got["mode"] == single["mode"]
        assert [it["item_id"] for it in got["items"]] == [it["item_id"] for it in single["items"]]


def test_manifest_new_item_bonus_is_the_default(client: httpx.Client, repeat_bundle: Path) -> None:
    """The bundle's fitted new-item bonus applies when a request does not set one: a tokenized
    item comes first (scored log P + 300); an explicit 0 answers as the plain search."""
    bundle = Bundle.load(repeat_bundle)
    item = {"item_id": "arrival-1", "title": "Night market skewers"}
    r = client.post("/tokenize", json={"items": [item]}, headers=AUTH)
    assert r.status_code == 200, r.text
    history = [bundle.catalogue.item_ids[i] for i in (4, 9)]
    default = post(client, history=history, k=10)
    assert default["items"][0]["item_id"] == "arrival-1" and default["items"][0]["new"]
    assert default["items"][0]["score"] > NEW_ITEM_BONUS - 100
    off = post(client, history=history, k=10, new_item_bonus=0)
    assert all(it["score"] < NEW_ITEM_BONUS - 100 for it in off["items"])  # no bonus anywhere


def test_the_manifest_mode_is_read_and_an_unknown_one_is_refused() -> None:
    from service.serving import RecommendDefaults

    fitted = {"repeat_prior": PRIOR.to_dict(), "mode": "repeat", "new_item_bonus": 1.5}
    d = RecommendDefaults.from_manifest(fitted)
    assert (d.mode, d.prior, d.new_item_bonus) == ("repeat", PRIOR, 1.5)
    assert RecommendDefaults.from_manifest({}).mode == "exclude_history"
    with pytest.raises(ValueError, match="recommend.mode: 'copy'"):
        RecommendDefaults.from_manifest({**fitted, "mode": "copy"})
