import json
from pathlib import Path

import pytest

from training.data import DataError, k_core, leave_one_out, load_dataset


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def lcrec(tmp_path: Path) -> Path:
    write(
        tmp_path / "Toy.item.json",
        json.dumps(
            {
                "0": {"title": "A", "description": "first"},
                "1": {"title": "B", "description": "second"},
                "2": {"description": "no title here"},
                "3": {"title": "D"},
            }
        ),
    )
    write(
        tmp_path / "Toy.inter.json", json.dumps({"u1": [0, 1, 2, 3], "u2": [3, 2, 1], "u3": [1, 0]})
    )
    return tmp_path


def test_lcrec_loader_keeps_order_and_counts_missing_titles(lcrec):
    ds = load_dataset(lcrec)
    assert ds.name == "Toy"
    assert ds.item_ids == ["0", "1", "2", "3"]
    assert ds.sequences == [[0, 1, 2, 3], [3, 2, 1], [1, 0]]
    assert ds.items[2]["title"] == "" and ds.stats["items_without_title"] == 1
    assert ds.n_interactions == 9


def test_leave_one_out_split_and_history_cut(lcrec):
    split = leave_one_out(load_dataset(lcrec), max_history=2)
    assert split.users == [0, 1]  # u3 has only two items
    assert split.train == [[0, 1], [3]]
    assert split.valid == [([0, 1], 2), ([3], 2)]
    assert split.test == [([1, 2], 3), ([3, 2], 1)]


def test_atomic_loader_sorts_by_timestamp_ties_by_file_order(tmp_path):
    write(
        tmp_path / "x.inter",
        "user_id:token\titem_id:token\ttimestamp:float\nu\ti2\t5\nu\ti1\t3\nu\ti3\t5\nv\ti1\t1\n",
    )
    write(
        tmp_path / "x.item",
        "item_id:token\tmovie_title:token_seq\tgenre:token_seq\n"
        "i1\tOne\tdrama\ni2\tTwo\tcomedy\ni3\tThree\t\n",
    )
    ds = load_dataset(tmp_path)
    rows = {iid: i for i, iid in enumerate(ds.item_ids)}
    assert ds.sequences[0] == [rows["i1"], rows["i2"], rows["i3"]]  # i2 before i3: file order
    assert ds.items[rows["i2"]]["title"] == "Two"
    assert "comedy" in ds.items[rows["i2"]]["description"]


def test_embedded_ml100k_loads():
    ds = load_dataset("ml-100k")
    assert (len(ds.user_ids), ds.n_items, ds.n_interactions) == (943, 1682, 100000)
    assert ds.items[0]["title"] == "Toy Story"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"B.item.json": "{", "B.inter.json": "{}"}, r"B.item.json: invalid JSON at line 1"),
        ({"B.item.json": "[]", "B.inter.json": "{}"}, r"B.item.json: expected an object"),
        ({"B.item.json": '{"0": "x"}', "B.inter.json": "{}"}, r"item '0': expected an object"),
        (
            {"B.item.json": '{"0": {}}', "B.inter.json": '{"u": [0, 7]}'},
            r"user 'u', position 1: item '7' is not in B.item.json",
        ),
        ({"B.item.json": '{"0": {}}', "B.inter.json": '{"u": 5}'}, r"user 'u': expected a list"),
        (
            {"B.item.json": '{"0": {}}', "B.inter.json": '{"u": [[0]]}'},
            r"position 0: item id \[0\] is not an int",
        ),
        ({"B.inter.json": "{}"}, r"no B.item.json"),
        (
            {"c.inter": "user_id:token\titem_id:token\nu\n"},
            r"c.inter: line 2: 1 fields, header has 2",
        ),
        (
            {"c.inter": "user:token\titem_id:token\nu\ti\n"},
            r"header lacks field\(s\) \['user_id'\]",
        ),
        (
            {"c.inter": "user_id:token\titem_id:token\ttimestamp:float\nu\ti\tsoon\n"},
            r"line 2: timestamp 'soon' is not a number",
        ),
        (
            {
                "c.inter": "user_id:token\titem_id:token\nu\tz\n",
                "c.item": "item_id:token\ttitle:token\ni\tI\n",
            },
            r"line 2: item 'z' is not in c.item",
        ),
        (
            {
                "c.inter": "user_id:token\titem_id:token\n",
                "c.item": "item_id:token\ttitle:token\ni\tI\ni\tJ\n",
            },
            r"c.item: line 3: duplicate item_id 'i'",
        ),
        ({"readme.txt": "hello"}, r"no X.inter.json"),
    ],
)
def test_malformed_inputs_name_file_record_and_problem(tmp_path, files, message):
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(DataError, match=message):
        load_dataset(tmp_path)


def test_unknown_path_and_name():
    with pytest.raises(DataError, match="not a directory and not an embedded dataset"):
        load_dataset("no-such-dataset")


def test_k_core_removes_sparse_users_and_items(lcrec):
    ds = k_core(load_dataset(lcrec), 3)
    # item 0 (2 interactions) goes, u3 drops to 1 item and goes, then items 1-3 have 2 each
    # and go too: the filter must iterate to the fixed point, which is empty here
    assert ds.sequences == [] and ds.user_ids == []
    assert ds.n_items == 4  # the catalogue keeps every item
    two = k_core(load_dataset(lcrec), 2)
    assert two.sequences == [[0, 1, 2, 3], [3, 2, 1], [1, 0]]
