"""New items recommended the moment they are tokenized, end to end over HTTP: a tiny recommender
trained on users who stay within one kind of shop (sushi users pick sushi shops), a new sushi
shop and a new bookshop added by POST /tokenize, and /recommend for a sushi user and a book
lover. The new sushi shop's identifier, computed from its text alone, shares its prefix with
the sushi shops the model learned, so the sushi user is offered it first, and the book lover the new bookshop before it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from models.bundle import Bundle
from models.recommender import RecommenderConfig, save_lm
from tests.bundlefactory import CATEGORIES, make_tiny_bundle, synthetic_items
from tests.service.conftest import AUTH, live_server, service_settings
from training.lm import LMTrainConfig, train_lm

N_ITEMS = 200
NEW = [
    {"item_id": "new-sushi", "title": "Shop 900 sushi", "description": "sushi, local, 4 stars"},
    {"item_id": "new-books", "title": "Shop 901 books", "description": "books, local, 4 stars"},
]


def kinds() -> np.ndarray:
    items = synthetic_items(N_ITEMS, seed=0)
    return np.array([next(c for c in CATEGORIES if it["title"].endswith(c)) for it in items])


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_tiny_bundle(tmp_path_factory.mktemp("e2e") / "b", N_ITEMS, seed=0, with_lm=False)
    bundle = Bundle.load(root)
    kind = kinds()
    rng = np.random.default_rng(0)
    seqs = [
        rng.choice(np.flatnonzero(kind == CATEGORIES[u % len(CATEGORIES)]), 8).tolist()
        for u in range(400)
    ]
    cfg = LMTrainConfig(
        model=RecommenderConfig(hidden=32, layers=2, heads=2, intermediate=64),
        epochs=8,
        batch_size=32,
        lr=3e-3,
        eval_every=100,
        patience=100,
    )
    torch.manual_seed(0)
    result = train_lm(
        seqs,
        [(s[:-1], s[-1]) for s in seqs[:50]],
        bundle.catalogue.codes,
        bundle.vocab,
        cfg,
        progress=False,
    )
    save_lm(result.model, bundle.vocab, root / "lm")
    return root


@pytest.fixture(scope="module")
def client(trained_bundle: Path) -> Iterator[httpx.Client]:
    with live_server(service_settings(trained_bundle)) as srv, srv.client() as c:
        r = c.post("/tokenize", json={"items": NEW}, headers=AUTH)
        assert r.status_code == 200, r.text
        yield c


def top(client: httpx.Client, kind: str, bonus: float, **options: float) -> list[dict]:
    history = [f"item-{i}" for i in np.flatnonzero(kinds() == kind)[:5]]
    body = {"history": history, "k": 10, "new_item_bonus": bonus, **options}
    r = client.post("/recommend", json=body)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_new_items_reach_the_users_whose_history_is_about_them(client: httpx.Client) -> None:
    sushi = top(client, "sushi", 3.0)
    books = top(client, "books", 3.0)
    assert sushi[0]["item_id"] == "new-sushi" and sushi[0]["new"]
    assert "new-books" not in [it["item_id"] for it in sushi]
    ranked = [it["item_id"] for it in books] + ["new-sushi"]
    assert ranked.index("new-books") < ranked.index("new-sushi")
    # Without the bonus the shared prefix still places the new sushi shop in the sushi user's
    # top 10, below the shops the model was trained on.
    plain = [it["item_id"] for it in top(client, "sushi", 0.0)]
    assert "new-sushi" in plain and plain[0] != "new-sushi"


def test_a_new_item_slot_offers_the_best_new_item_in_place_of_the_last_warm_one(
    client: httpx.Client,
) -> None:
    """Two slots with a wide margin: the sushi user's list keeps the new sushi shop where it
    ranks on merit and gives the second slot to the other new item, in place of the last warm
    item; the warm items keep their order. With a margin no score can meet, nothing changes."""
    plain = [it["item_id"] for it in top(client, "sushi", 0.0)]
    got = top(client, "sushi", 0.0, new_item_slots=2, new_item_margin=1000.0)
    ids = [it["item_id"] for it in got]
    assert ids[-1] == "new-books" and got[-1]["new"]
    assert [i for i in ids if i != "new-books"] == plain[:9]
    assert "new-sushi" in ids  # on merit, counted as one of the two slots
    shut = top(client, "sushi", 0.0, new_item_slots=2, new_item_margin=-1000.0)
    assert [it["item_id"] for it in shut] == plain
