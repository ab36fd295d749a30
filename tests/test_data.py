"""`mudd prepare`, the bundled corpus and batch sampling."""

import bz2
import gzip
import json
import lzma
from pathlib import Path

import numpy as np
import pytest
import torch

from muddformer.cli import main
from muddformer.data.batches import eval_windows, sample_batch
from muddformer.data.corpus import VALIDATION_PLAYS, bundled_plays, cache_dir
from muddformer.data.shards import TokenData, prepare
from muddformer.data.tokenizers import export_tokenizer, load_tokenizer, tokenizer_file
from muddformer.errors import DataError


def test_bundled_corpus_is_38_plays_split_by_play():
    plays = bundled_plays()
    assert len(plays) == 38
    names = {p["name"] for p in plays}
    assert set(VALIDATION_PLAYS) <= names and "hamlet" in names
    hamlet = next(p for p in plays if p["name"] == "hamlet")["text"]
    assert hamlet.startswith("HAMLET\n") and "HAMLET:\nTo be, or not to be" in hamlet
    assert not any(ch in "".join(p["text"] for p in plays) for ch in "*_#\\")
    assert sum(len(p["text"]) for p in plays) > 4_900_000


def test_prepare_text_jsonl_and_folder(tmp_path):
    text = "Now is the winter of our discontent\nMade glorious summer by this sun of York.\n" * 40
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}: " + text[:300]}) for i in range(12)))
    out = tmp_path / "prepared"
    meta = prepare(
        [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], out, vocab_size=300, field="body", val_fraction=0.2
    )
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    data = TokenData(out)
    assert data.splits["train"].tokens == meta["splits"]["train"]["tokens"] > 0
    assert data.splits["val"].tokens > 0
    tok = load_tokenizer(data.tokenizer_path)
    first = np.asarray(data.splits["train"].shards[0][:20]).tolist()
    assert tok.decode(first).startswith("Now is the winter")
    assert meta["eot_id"] == 0 and 0 in np.asarray(data.splits["train"].shards[0]).tolist()

    # Idempotent: the same inputs and options leave the folder untouched.
    stamp = (out / "train-00000.bin").stat().st_mtime_ns
    prepare([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], out, vocab_size=300, field="body", val_fraction=0.2)
    assert (out / "train-00000.bin").stat().st_mtime_ns == stamp
    # Other options rebuild it, reusing a given tokenizer; small shards split the tokens.
    meta2 = prepare([str(tmp_path)], out, tokenizer=str(data.tokenizer_path), field="body", shard_tokens=200)
    assert len(meta2["splits"]["train"]["shards"]) > 1
    assert TokenData(out).splits["train"].tokens == meta2["splits"]["train"]["tokens"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def plays_as_records(tmp_path) -> tuple[list[str], Path]:
    """Forty documents (speeches of the bundled plays) as a .jsonl file."""
    plays = bundled_plays()[:2]
    docs = [speech for p in plays for speech in p["text"].split("\n\n")[1:21]]
    path = tmp_path / "speeches.jsonl"
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return docs, path


def shards_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def test_prepare_reads_every_format_and_compression_alike(tmp_path, play_data):
    docs, jsonl = plays_as_records(tmp_path)
    tokenizer = str(play_data / "tokenizer.json")
    plain = prepare([str(jsonl)], tmp_path / "plain", tokenizer=tokenizer, val_documents=4)
    formats = tmp_path / "formats"
    formats.mkdir()
    raw = jsonl.read_bytes()
    for stem, name, packed in (
        ("a", "gz", gzip.compress(raw)),
        ("b", "bz2", bz2.compress(raw)),
        ("c", "xz", lzma.compress(raw)),
    ):
        path = formats / f"{stem}.jsonl.{name}"
        path.write_bytes(packed)
        out = tmp_path / name
        assert prepare([str(path)], out, tokenizer=tokenizer, val_documents=4) == {
            **plain,
            "fingerprint": json.loads((out / "meta.json").read_text())["fingerprint"],
            "source": str(path),
        }
        assert shards_of(out) == shards_of(tmp_path / "plain"), name
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"n": list(range(len(docs))), "text": docs})
    pq.write_table(table, formats / "d.parquet", row_group_size=7)  # rows read across row groups
    prepare([str(formats / "d.parquet")], tmp_path / "pq", tokenizer=tokenizer, val_documents=4)
    assert shards_of(tmp_path / "pq") == shards_of(tmp_path / "plain")
    with pytest.raises(DataError, match=r"d.parquet has no column 'body' \(it has n, text\); pass --field"):
        prepare([str(formats / "d.parquet")], tmp_path / "o", field="body")
    with pytest.raises(DataError, match=r"d.parquet's column 'n' holds int64, not text; pass --field"):
        prepare([str(formats / "d.parquet")], tmp_path / "o", field="n")
    # A folder: its four files in sorted order (a, b, c, d); the last 4 documents are the last file's.
    prepare([str(formats)], tmp_path / "folder", tokenizer=tokenizer, val_documents=4)
    train, val = (TokenData(tmp_path / "folder").splits[s].tokens for s in ("train", "val"))
    assert val == plain["splits"]["val"]["tokens"]
    assert train == 4 * plain["splits"]["train"]["tokens"] + 3 * plain["splits"]["val"]["tokens"]


def test_prepare_holds_out_the_last_documents_and_reads_them_in_one_pass(tmp_path, play_data):
    docs, jsonl = plays_as_records(tmp_path)
    tok = load_tokenizer(play_data / "tokenizer.json")
    meta = prepare([str(jsonl)], tmp_path / "d", tokenizer=str(play_data), val_documents=3, shard_tokens=500)
    data = TokenData(tmp_path / "d")
    expected = {
        split: [i for d in texts for i in tok.encode(d).ids + [0]]
        for split, texts in (("train", docs[:-3]), ("val", docs[-3:]))
    }
    for split, ids in expected.items():
        got = np.concatenate([np.asarray(s) for s in data.splits[split].shards]).tolist()
        assert got == ids, split
    assert len(meta["splits"]["train"]["shards"]) > 2  # small shards, each ending at a document's end
    assert all(np.asarray(s)[-1] == 0 for s in data.splits["train"].shards)
    share = prepare([str(jsonl)], tmp_path / "share", tokenizer=str(play_data), val_fraction=0.1)
    assert share["splits"]["val"]["tokens"] == sum(len(tok.encode(d).ids) + 1 for d in docs[-4:])  # 10 % of 40
    with pytest.raises(DataError, match="--val-documents must be between 1 and 39 \\(the data has 40 documents\\)"):
        prepare([str(jsonl)], tmp_path / "o", val_documents=40)


def test_the_bpe_trains_on_a_sample_of_the_first_documents(tmp_path):
    docs, jsonl = plays_as_records(tmp_path)
    whole = prepare([str(jsonl)], tmp_path / "whole", vocab_size=300)
    first = sum(len(d) for d in docs[:5])
    sampled = prepare([str(jsonl)], tmp_path / "sample", vocab_size=300, tokenizer_sample_chars=first)
    (tmp_path / "five.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:6]))
    prepare([str(tmp_path / "five.jsonl")], tmp_path / "five", vocab_size=300, val_documents=1)  # trains on 5
    bpe = {name: (tmp_path / name / "tokenizer.json").read_text() for name in ("whole", "sample", "five")}
    assert bpe["sample"] == bpe["five"] != bpe["whole"]  # trained on the first five documents only
    assert sampled["fingerprint"] != whole["fingerprint"]
    with pytest.raises(DataError, match="tokenizer_sample_chars must be positive"):
        prepare([str(jsonl)], tmp_path / "o", tokenizer_sample_chars=0)


def test_prepare_names_a_damaged_or_unreadable_file(tmp_path):
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read .*bad.jsonl.gz \(.*\); is it a .jsonl.gz file\?"):
        prepare([str(tmp_path / "bad.jsonl.gz")], tmp_path / "o")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
    with pytest.raises(DataError, match=r"cannot read .*bad.parquet \(.*\); is it a .parquet file\?"):
        prepare([str(tmp_path / "bad.parquet")], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_missing_or_broken_reader_package_is_named_with_the_fix(tmp_path, monkeypatch):
    # pyarrow and zstandard are optional: missing, the message names the package; installed but failing to
    # import (pyarrow 15 under numpy 2 does), it says so instead of asking to install what is there.
    from muddformer.data.documents import optional_module

    with pytest.raises(DataError, match=r"^reading a.parquet needs the no_such_reader package: pip install no_such_"):
        optional_module("no_such_reader.parquet", Path("a.parquet"))
    (tmp_path / "broken_reader").mkdir()
    failing = "raise ImportError('A module that was compiled using NumPy 1.x\\n\\nbuilt for numpy 1.x')\n"
    (tmp_path / "broken_reader" / "__init__.py").write_text(failing)  # the last line of a long message is kept
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(DataError) as caught:
        optional_module("broken_reader", Path("a.jsonl.zst"))
    assert str(caught.value) == (
        "reading a.jsonl.zst needs broken_reader, which is installed but fails to import (built for numpy 1.x); "
        "upgrade it: pip install -U broken_reader"
    )


def test_prepare_refuses_bad_input(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "missing.txt")], tmp_path / "o")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="the data is empty"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "o")
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DataError, match="has no field 'body'"):
        prepare([str(tmp_path / "x.jsonl")], tmp_path / "o", field="body")
    with pytest.raises(DataError, match="not a prepared data folder"):
        TokenData(tmp_path)
    (tmp_path / "a.txt").write_text("hi there\n")
    for missing in (tmp_path / "no-tokenizer.json", tmp_path):  # a file, or a folder without tokenizer.json
        with pytest.raises(DataError, match="tokenizer.json does not exist; pass a tokenizer.json or a folder"):
            prepare([str(tmp_path / "a.txt")], tmp_path / "o", tokenizer=str(missing))
    assert not (tmp_path / "o").exists()


def test_a_model_tokenizer_is_the_given_one_or_the_folders_own(play_data, tmp_path):
    model, given = tmp_path / "model", play_data / "tokenizer.json"
    model.mkdir()
    with pytest.raises(DataError, match="model has no tokenizer.json; pass --tokenizer FILE"):
        tokenizer_file(model, None)
    with pytest.raises(DataError, match="tokenizer file .*missing.json does not exist"):  # names the given file
        tokenizer_file(model, tmp_path / "missing.json")
    assert tokenizer_file(model, play_data) == tokenizer_file(model, given) == given
    export_tokenizer(play_data, model, 64)  # a folder that holds one, as everywhere else
    assert tokenizer_file(model, None).read_bytes() == given.read_bytes()


def test_prepare_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("To be, or not to be, that is the question.\n" * 200)
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--vocab-size", "280"]) == 0
    assert "vocabulary 280 (uint16)" in capsys.readouterr().out
    assert main(["prepare", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "d2")]) == 2
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"body": f"line {i} " * 20}) + "\n" for i in range(10)))
    args = ["prepare", str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "d3"), "--field", "body"]
    assert main(args + ["--vocab-size", "280", "--val-documents", "2", "--tokenizer-sample-chars", "500"]) == 0
    val = TokenData(tmp_path / "d3").splits["val"]
    assert load_tokenizer(tmp_path / "d3").decode(np.asarray(val.shards[0]).tolist()).startswith("line 8 line 8")


def test_truncated_shard_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("Friends, Romans, countrymen, lend me your ears.\n" * 100)
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", vocab_size=280)
    shard = tmp_path / "d" / "train-00000.bin"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-10])
    with pytest.raises(DataError, match="truncated: run `mudd prepare` again"):
        TokenData(tmp_path / "d")
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", vocab_size=280)  # which repairs it
    assert shard.read_bytes() == whole
    (tmp_path / "d" / "val-00000.bin").unlink()
    with pytest.raises(DataError, match="val-00000.bin is missing; run `mudd prepare` again"):
        TokenData(tmp_path / "d")
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", vocab_size=280)
    assert TokenData(tmp_path / "d").splits["train"].tokens == len(whole) // 2


def test_sampling_is_a_function_of_step_and_splits_across_ranks(tmp_path):
    (tmp_path / "a.txt").write_text("Out, damned spot! out, I say!\n" * 300)
    prepare([str(tmp_path / "a.txt")], tmp_path / "d", vocab_size=280)
    split = TokenData(tmp_path / "d").split("train", 16)
    x, y = sample_batch(split, 16, 4, seed=1, step=7)
    again, _ = sample_batch(split, 16, 4, seed=1, step=7)
    assert torch.equal(x, again) and torch.equal(x[:, 1:], y[:, :-1])
    halves = [sample_batch(split, 16, 2, seed=1, step=7, rank=r, world=2)[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), x)
    micro = [sample_batch(split, 16, 2, seed=1, step=7, micro=m, accum=2)[0] for m in range(2)]
    assert torch.equal(torch.cat(micro), x)
    assert not torch.equal(sample_batch(split, 16, 4, seed=1, step=8)[0], x)
    starts = eval_windows(split, 16, 5)
    assert len(starts) == 5 and starts[0] == 0 and starts[-1] == split.tokens - 17


def test_cache_folder_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MUDD_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("MUDD_CACHE", "")  # an empty variable is unset, not the current folder
    assert cache_dir() == Path.home() / ".cache" / "muddformer"


def test_prepare_keeps_its_inputs_and_other_folders_safe(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "a.txt").write_text("Once more unto the breach, dear friends, once more.\n" * 50)
    for out in (tmp_path / "data", raw):  # writing would replace the folder, inputs and all
        with pytest.raises(DataError, match="holds the input .*, which writing it would delete; choose another --out"):
            prepare([str(raw)], out, vocab_size=280)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.md").write_text("keep me")
    with pytest.raises(DataError, match="notes exists and is not a prepared data folder; give --out a new"):
        prepare([str(raw)], tmp_path / "notes", vocab_size=280)
    assert (raw / "a.txt").is_file() and (tmp_path / "notes" / "todo.md").read_text() == "keep me"
    (raw / "a.txt.gz").write_bytes(gzip.compress((raw / "a.txt").read_bytes()))
    with pytest.raises(DataError, match="a.txt and .*a.txt.gz look like one file, plain and compressed; keep one"):
        prepare([str(raw)], tmp_path / "d", vocab_size=280)


def test_prepare_reads_a_file_again_when_its_name_says_another_format(tmp_path):
    lines = "".join(json.dumps({"text": f"speech {i}: " + "words " * 30}) + "\n" for i in range(20))
    (tmp_path / "x.txt").write_text(lines)  # read as one text document, JSON and all
    as_text = prepare([str(tmp_path / "x.txt")], tmp_path / "d", vocab_size=280)
    (tmp_path / "x.txt").rename(tmp_path / "x.jsonl")  # the same bytes, now records
    as_records = prepare([str(tmp_path / "x.jsonl")], tmp_path / "d", vocab_size=280)
    assert as_records["fingerprint"] != as_text["fingerprint"]
    assert as_records["splits"]["val"]["tokens"] < as_text["splits"]["val"]["tokens"]  # 1 record, not 5 % of it


def test_prepare_takes_text_values_only(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["to be " * 20, None, "or not " * 20, "that is " * 20])
    )
    meta = prepare([str(tmp_path / "a.jsonl")], tmp_path / "d", vocab_size=280, val_documents=1)
    tok = load_tokenizer(tmp_path / "d")
    assert meta["splits"]["train"]["tokens"] == sum(len(tok.encode(t * 20).ids) + 1 for t in ("to be ", "or not "))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": 42}) + "\n")
    with pytest.raises(DataError, match=r"b.jsonl:1's field 'text' holds int, not text; pass --field"):
        prepare([str(tmp_path / "b.jsonl")], tmp_path / "o")


def test_prepare_refuses_a_held_out_split_it_cannot_make(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(3)))
    (tmp_path / "one.txt").write_text("a single document " * 40)
    with pytest.raises(DataError, match="--val-fraction 0.9 of 3 documents holds out all of them; lower it"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "o", val_fraction=0.9)
    for one_or_many in ("one.txt", "a.jsonl"):  # both ways to split check the share
        with pytest.raises(DataError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
            prepare([str(tmp_path / one_or_many)], tmp_path / "o", val_fraction=1.5)
    with pytest.raises(DataError, match="--val-documents needs two documents or more"):
        prepare([str(tmp_path / "one.txt")], tmp_path / "o", val_documents=1)
    with pytest.raises(DataError, match="give --val FILES or --val-documents N, not both"):
        prepare([str(tmp_path / "a.jsonl")], tmp_path / "o", val_inputs=[str(tmp_path / "one.txt")], val_documents=1)
    damaged = bytearray(gzip.compress((tmp_path / "a.jsonl").read_bytes()))
    damaged[20:30] = b"\xff" * 10
    (tmp_path / "a.jsonl.gz").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"cannot read .*a.jsonl.gz \(.*\); is it a .jsonl.gz file\?"):
        prepare([str(tmp_path / "a.jsonl.gz")], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_tokenising_batches_are_bounded_in_texts_and_characters():
    from muddformer.data.shards import batched

    pairs = [("train", "x" * n) for n in (3, 3, 3, 10, 1, 1, 1, 1)]
    sizes = [[len(t) for _, t in batch] for batch in batched(pairs, max_texts=3, max_chars=6)]
    assert sizes == [[3, 3], [3], [10], [1, 1, 1], [1]]  # a text over the limit is a batch of its own


def test_zstd_files_are_read_frame_after_frame_and_a_truncated_one_is_refused(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    docs = [json.dumps({"text": f"speech {i} " * 40}) + "\n" for i in range(30)]
    compress = zstandard.ZstdCompressor().compress
    (tmp_path / "a.jsonl").write_text("".join(docs))
    frames = compress("".join(docs[:10]).encode()) + compress("".join(docs[10:]).encode())  # as pzstd writes
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "a.jsonl.zst").write_bytes(frames)
    plain = prepare([str(tmp_path / "a.jsonl")], tmp_path / "plain", vocab_size=280)
    packed = prepare([str(tmp_path / "z" / "a.jsonl.zst")], tmp_path / "packed", vocab_size=280)
    assert packed["splits"] == plain["splits"] and shards_of(tmp_path / "packed") == shards_of(tmp_path / "plain")
    (tmp_path / "z" / "a.jsonl.zst").write_bytes(frames[:-7])  # cut inside the last frame
    with pytest.raises(DataError, match=r"cannot read .*a.jsonl.zst \(.*truncated.*\); is it a .jsonl.zst file\?"):
        prepare([str(tmp_path / "z" / "a.jsonl.zst")], tmp_path / "o")
