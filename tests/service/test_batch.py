"""Batch recommendation (service/batch.py, service/batch_ray.py) on the tiny real bundle: the
local runner against a live server's /recommend, the Ray runner against the local one,
resumption, and the CLI over both input formats."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from letterrec.cli import app
from models.bundle import Bundle
from service.batch import (
    BatchConfig,
    BatchError,
    BatchRecommender,
    read_output,
    read_users_parquet,
    run_local,
    users_table,
)
from tests.service.conftest import live_server, service_settings


def some_users(bundle: Path, n: int = 7, seed: int = 0) -> pa.Table:
    """Histories of 0..30 catalogue items (longer than the prompt's 20), one with an unknown id."""
    ids = Bundle.load(bundle).catalogue.item_ids
    rng = np.random.default_rng(seed)
    histories = [[str(i) for i in rng.choice(ids, size=int(rng.integers(1, 31)))] for _ in range(n)]
    histories[1] = []
    histories[2] = ["not-in-the-catalogue", *histories[2]]
    return users_table([f"user-{i}" for i in range(n)], histories)


def per_user(table: pa.Table) -> dict[str, list[tuple[int, str, float]]]:
    out: dict[str, list[tuple[int, str, float]]] = {}
    for r in table.to_pylist():
        out.setdefault(r["user_id"], []).append((r["rank"], r["item_id"], r["score"]))
    return out


def test_local_runner_answers_as_live_recommend(tiny_bundle: Path, tmp_path: Path) -> None:
    users = some_users(tiny_bundle)
    cfg = BatchConfig(tiny_bundle, k=7, batch_size=4, chunk_size=4, threads=1)
    result = run_local(users, tmp_path / "out", cfg, progress=False)
    assert result == {"users": 7, "done_users": 7, "chunks": 2}
    got = per_user(read_output(tmp_path / "out"))
    assert list(got) == users.column("user_id").to_pylist()
    histories = users.column("history").to_pylist()
    with (
        live_server(service_settings(tiny_bundle, torch_threads=1)) as server,
        server.client() as c,
    ):
        for user, history in zip(got, histories, strict=True):
            r = c.post("/recommend", json={"history": history, "k": 7})
            assert r.status_code == 200, r.text
            want = r.json()["items"]
            assert [i for _, i, _ in got[user]] == [it["item_id"] for it in want]
            assert [rank for rank, _, _ in got[user]] == list(range(1, len(want) + 1))
            # Alone in its batch the search pads differently: the same floats up to rounding.
            np.testing.assert_allclose(
                [s for _, _, s in got[user]], [it["score"] for it in want], rtol=1e-5
            )
        # The same engine batches (batch_size users at a time) give the same floats exactly.
        for start in range(0, len(histories), cfg.batch_size):
            chunk = histories[start : start + cfg.batch_size]
            reqs = [{"history": h, "k": 7} for h in chunk]
            r = c.post("/recommend/batch", json={"requests": reqs})
            assert r.status_code == 200, r.text
            for user, resp in zip(list(got)[start:], r.json()["responses"], strict=False):
                assert got[user] == [
                    (n, it["item_id"], it["score"]) for n, it in enumerate(resp["items"], 1)
                ]


def test_resume_after_a_crash_redoes_no_finished_chunk(tiny_bundle: Path, tmp_path: Path) -> None:
    users = some_users(tiny_bundle, n=7)
    cfg = BatchConfig(tiny_bundle, k=5, batch_size=2, chunk_size=2, threads=1)
    decoded: list[str] = []

    class Crashing(BatchRecommender):
        """Decodes for real, and dies on the third engine batch (chunk 2)."""

        def recommend_table(self, users: pa.Table) -> pa.Table:
            if crash and len(decoded) == 4:
                raise RuntimeError("killed")
            decoded.extend(users.column("user_id").to_pylist())
            return super().recommend_table(users)

    out = tmp_path / "out"
    crash = True
    with pytest.raises(RuntimeError, match="killed"):
        run_local(users, out, cfg, progress=False, recommender=Crashing)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert sorted(finished) == ["part-00000.parquet", "part-00001.parquet"]
    assert not json.loads((out / "_job.json").read_text()).get("complete")

    crash, decoded[:] = False, []
    result = run_local(users, out, cfg, progress=False, recommender=Crashing)
    assert result == {"users": 7, "done_users": 3, "chunks": 2}
    assert decoded == ["user-4", "user-5", "user-6"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-0000[01].parquet")} == finished
    assert json.loads((out / "_job.json").read_text())["complete"] is True

    resumed = read_output(out)
    keys = list(zip(resumed["user_id"].to_pylist(), resumed["rank"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == 7 * 5
    assert run_local(users, tmp_path / "whole", cfg, progress=False)["done_users"] == 7
    assert resumed.equals(read_output(tmp_path / "whole"))
    # A finished job does nothing when rerun.
    assert run_local(users, out, cfg, progress=False)["done_users"] == 0


def test_resume_refuses_the_output_of_another_job(tiny_bundle: Path, tmp_path: Path) -> None:
    users = some_users(tiny_bundle, n=3)
    cfg = BatchConfig(tiny_bundle, k=5, batch_size=2, chunk_size=2, threads=1)
    run_local(users, tmp_path / "out", cfg, progress=False)
    with pytest.raises(BatchError, match=r"another job \(k differ"):
        run_local(users, tmp_path / "out", dataclasses.replace(cfg, k=6), progress=False)
    with pytest.raises(BatchError, match="users_fingerprint"):
        run_local(some_users(tiny_bundle, n=3, seed=1), tmp_path / "out", cfg, progress=False)
    with pytest.raises(BatchError, match="k must be in 1..100"):
        BatchConfig(tiny_bundle, k=101)


def test_ray_actor_decodes_each_engine_batch_alone(tiny_bundle: Path, tmp_path: Path) -> None:
    """Ray may bundle a chunk's short last batch with the next chunk's first into one call; the
    actor still decodes them as the local runner does, batch by batch."""
    from service.batch_ray import RecommendActor, _blocks

    ids = Bundle.load(tiny_bundle).catalogue.item_ids
    # Prompts of different lengths: a batch's padding, and with it its floats, depend on them
    # (checked: decoding rows 2-4 as one batch changes scores in the last bits).
    histories = [ids[:5], ids[50:53], [], ids[10:35], ids[40:41]]
    users = users_table(list("abcde"), histories)
    cfg = BatchConfig(tiny_bundle, k=5, batch_size=2, chunk_size=3, threads=1)
    run_local(users, tmp_path / "local", cfg, progress=False)
    blocks = _blocks(users, [(0, 0, 3), (1, 3, 5)], cfg.batch_size)
    assert [b.num_rows for b in blocks] == [2, 1, 2]
    got = RecommendActor(cfg)(pa.concat_tables(blocks[1:]))  # rows 2 | 3, 4 in one call
    assert got.column("row").to_pylist() == [2, 3, 4]
    assert got.column("chunk").to_pylist() == [0, 1, 1]
    local = per_user(read_output(tmp_path / "local"))
    for user, items, scores in zip(
        *got.select(["user_id", "items", "scores"]).to_pydict().values(), strict=True
    ):
        assert local[user] == [
            (n, i, s) for n, (i, s) in enumerate(zip(items, scores, strict=True), 1)
        ]


@pytest.mark.slow
def test_ray_runner_with_two_workers_matches_local(tiny_bundle: Path, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the ray runner needs the .[scale] extra")
    from service.batch_ray import run_ray

    users = some_users(tiny_bundle, n=9)
    # Uneven chunks and batches: a chunk's last batch is short, and Ray may bundle it with the
    # next chunk's first one.
    cfg = BatchConfig(tiny_bundle, k=6, batch_size=2, chunk_size=3, threads=1)
    run_local(users, tmp_path / "local", cfg, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        t0 = time.perf_counter()
        result = run_ray(users, tmp_path / "ray", cfg, workers=2, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert result == {"users": 9, "done_users": 9, "chunks": 3}
    assert sorted(p.name for p in (tmp_path / "ray").glob("part-*")) == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    for part in ("part-00000.parquet", "part-00001.parquet", "part-00002.parquet"):
        assert pq.read_table(tmp_path / "ray" / part).equals(
            pq.read_table(tmp_path / "local" / part)
        ), part
    print(f"ray runner, 2 workers, 9 users: {seconds:.1f} s")


def test_cli_reads_a_dataset_and_a_parquet_file(tiny_bundle: Path, tmp_path: Path) -> None:
    ids = Bundle.load(tiny_bundle).catalogue.item_ids
    data = tmp_path / "shop"
    data.mkdir()
    sequences = {"7": ids[:3], "8": ids[10:35], "9": [ids[5]]}
    (data / "shop.inter.json").write_text(json.dumps(sequences))
    (data / "shop.item.json").write_text(json.dumps({i: {"title": i} for i in ids[:40]}))
    # Integer user ids, as many exports have them: read as strings.
    users_file = tmp_path / "users.parquet"
    pq.write_table(
        pa.table({"user_id": [7, 8, 9], "history": list(sequences.values())}), users_file
    )
    runner = CliRunner()
    for name, source in (("from-dataset", data), ("from-parquet", users_file)):
        r = runner.invoke(
            app,
            ["batch-recommend", "--bundle", str(tiny_bundle), "--users", str(source),
             "--out", str(tmp_path / name), "--k", "4", "--threads", "1", "--quiet"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
    want = tmp_path / "want"
    users = users_table(list(sequences), list(sequences.values()))
    run_local(users, want, BatchConfig(tiny_bundle, k=4, threads=1), progress=False)
    assert read_output(tmp_path / "from-dataset").equals(read_output(want))
    assert read_output(tmp_path / "from-parquet").equals(read_output(want))
    assert read_users_parquet(users_file).equals(users)
    bad = runner.invoke(
        app,
        ["batch-recommend", "--bundle", str(tiny_bundle), "--users", str(tmp_path / "nope"),
         "--out", str(tmp_path / "bad")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "nope" in bad.output
