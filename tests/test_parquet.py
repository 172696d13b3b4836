"""`preprocess --input X.parquet|DIR`: parquet read directly gives the same .bin/.idx as the equivalent jsonl."""
from __future__ import annotations

import json

import pytest

from megatron_patch.errors import UserError

pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa  # noqa: E402

DOCS = [f"Document {i}: " + "words and more words " * (i % 5) + "end." for i in range(23)] + ["", "  "]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from megatron_patch.convert.mini import train_tokenizer

    path = tmp_path_factory.mktemp("tok")
    train_tokenizer(512).save_pretrained(path)
    return str(path)


def _write_parquet_dir(root):
    """DOCS split over two files (one in a subdirectory), several row groups each, plus an unrelated column."""
    root.mkdir()
    (root / "sub").mkdir()
    half = len(DOCS) // 2
    for path, docs in ((root / "a.parquet", DOCS[:half]), (root / "sub" / "b.parquet", DOCS[half:])):
        table = pa.table({"id": list(range(len(docs))), "content": docs})
        pq.write_table(table, str(path), row_group_size=4)
    assert pq.ParquetFile(root / "a.parquet").num_row_groups > 1
    return root


def test_parquet_dir_equals_jsonl(tokenizer, tmp_path):
    from megatron_patch.data.parquet import parquet_to_jsonl
    from megatron_patch.data.preprocess import preprocess

    src = _write_parquet_dir(tmp_path / "pq")
    jsonl = tmp_path / "docs.jsonl"
    parquet_to_jsonl(src, jsonl)
    assert [json.loads(x)["content"] for x in jsonl.read_text().splitlines()] == DOCS
    ref = preprocess([str(jsonl)], tokenizer, str(tmp_path / "ref"), json_key="content", append_eod=True,
                     progress=False)
    got = preprocess([str(src)], tokenizer, str(tmp_path / "got"), json_key="content", append_eod=True,
                     progress=False)
    assert got == ref and ref["documents"] == len(DOCS) - 2 and ref["empty"] == 2
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"got{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    one = preprocess([str(src / "a.parquet")], tokenizer, str(tmp_path / "one"), json_key="content",
                     progress=False)
    assert one["documents"] == len(DOCS) // 2


def test_parquet_bad_column_is_a_user_error(tokenizer, tmp_path):
    from megatron_patch.data.preprocess import preprocess

    src = _write_parquet_dir(tmp_path / "pq")
    with pytest.raises(UserError, match=r"no column 'text'.*--json-key"):
        preprocess([str(src)], tokenizer, str(tmp_path / "out"), progress=False)
    with pytest.raises(UserError, match="holds int"):
        preprocess([str(src)], tokenizer, str(tmp_path / "out"), json_key="id", progress=False)
    assert not list(tmp_path.glob("out*"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .parquet files"):
        preprocess([str(tmp_path / "empty")], tokenizer, str(tmp_path / "out"), progress=False)
