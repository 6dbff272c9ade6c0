"""The regex tokenizer (stand-in for nltk's word_tokenize) and the SCAN-JSON vocabulary."""
from __future__ import annotations

import json

import pytest

from pipeline.data.vocab import Vocab, build_vocab, tokenize
from pipeline.errors import InputError

# expected values are what nltk.word_tokenize(caption.lower()) returns
NLTK_CASES = [
    ("A man riding a wave on top of a surfboard.",
     ["a", "man", "riding", "a", "wave", "on", "top", "of", "a", "surfboard", "."]),
    ("A man's dog isn't running.", ["a", "man", "'s", "dog", "is", "n't", "running", "."]),
    ("They're sure he can't, I'm told; we'll see. I'd go, you've been",
     ["they", "'re", "sure", "he", "ca", "n't", ",", "i", "'m", "told", ";", "we", "'ll", "see",
      ".", "i", "'d", "go", ",", "you", "'ve", "been"]),
    ("the dogs' toys", ["the", "dogs", "'", "toys"]),
    ("Two dogs, one black-and-white, play!", ["two", "dogs", ",", "one", "black-and-white", ",",
                                              "play", "!"]),
    ("a close-up of a t-shirt", ["a", "close-up", "of", "a", "t-shirt"]),
    ("3.5 inches, 1,000 people at 10:30", ["3.5", "inches", ",", "1,000", "people", "at", "10:30"]),
    ("Is it a dog?", ["is", "it", "a", "dog", "?"]),
    ("A dog (brown) waits...", ["a", "dog", "(", "brown", ")", "waits", "..."]),
    ("  A  MAN \n SITS\t", ["a", "man", "sits"]),
    ("", []),
]


@pytest.mark.parametrize("text,expected", NLTK_CASES)
def test_tokenize_like_nltk(text, expected):
    assert tokenize(text) == expected


# Harder cases nltk's word_tokenize handles: numbers inside words, other scripts,
# "cannot", double quotes.
NLTK_HARDER = [
    ("a 2-year-old boy", ["a", "2-year-old", "boy"]),
    ("the 12th floor", ["the", "12th", "floor"]),
    ("a café table", ["a", "café", "table"]),
    ("a jalapeño pizza", ["a", "jalapeño", "pizza"]),
    ("he cannot", ["he", "can", "not"]),
    ('a "stop" sign', ["a", "``", "stop", "''", "sign"]),
]


@pytest.mark.parametrize("text,expected", NLTK_HARDER)
def test_tokenize_harder_cases(text, expected):
    assert tokenize(text) == expected


def test_specials_and_encode_decode():
    v = Vocab(["dog", "man"])
    assert [v.word2idx[w] for w in ("<pad>", "<start>", "<end>", "<unk>")] == [0, 1, 2, 3]
    assert len(v) == 6
    ids = v.encode("A dog bites the man.")
    assert ids == [1, 3, 4, 3, 3, 5, 3, 2]
    assert v.decode(ids) == "<unk> dog <unk> <unk> man <unk>"
    assert v("zebra") == 3 and "dog" in v and "zebra" not in v


def test_build_vocab_threshold_and_order():
    # counts: dog 5, man 5, cat 4, bird 3, a 1
    caps = ["dog dog dog dog", "cat cat cat bird", "man man man man man", "a dog", "cat bird bird"]
    v = build_vocab(caps, threshold=4)
    assert [v.idx2word[i] for i in range(4, len(v))] == ["dog", "man", "cat"]  # by count, ties alphabetical
    assert "bird" not in v and v("bird") == 3                               # 3 < threshold
    assert "bird" in build_vocab(caps, threshold=3)
    assert len(build_vocab(caps, threshold=1)) == 4 + 5
    assert [build_vocab(["b a", "a b"], threshold=2).idx2word[i] for i in (4, 5)] == ["a", "b"]


def test_scan_json_round_trip(tmp_path):
    v = build_vocab(["a dog runs", "a dog sits", "a cat runs"], threshold=1)
    p = tmp_path / "coco_precomp_vocab.json"
    v.save(p)
    obj = json.loads(p.read_text())
    assert set(obj) == {"word2idx", "idx2word", "idx"}
    assert obj["idx"] == len(v)
    assert obj["idx2word"]["0"] == "<pad>" and obj["idx2word"]["3"] == "<unk>"
    assert all(isinstance(k, str) for k in obj["idx2word"])
    w = Vocab.load(p)
    assert w.word2idx == v.word2idx and w.idx2word == v.idx2word
    assert w.encode("a dog flies") == v.encode("a dog flies")


def test_loads_scan_file_with_only_word2idx(tmp_path):
    # files written by SCAN's vocab.py carry idx2word and idx too; word2idx alone is enough
    p = tmp_path / "v.json"
    p.write_text(json.dumps({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 4}}))
    v = Vocab.load(p)
    assert len(v) == 5 and v.idx2word[4] == "x"


@pytest.mark.parametrize("content,fragment", [
    (None, "not found"),
    (b"{not json", "unreadable vocab JSON"),
    (b"\xff\xfe\x00garbage", "unreadable vocab JSON"),
    (b"[1, 2, 3]", "word2idx"),
    (b'{"idx2word": {"0": "<pad>"}}', "word2idx"),
    (b'{"word2idx": {"<pad>": "zero"}}', "word2idx"),
    (b'{"word2idx": {"<pad>": 0, "<start>": 2, "<end>": 1, "<unk>": 3}}', "<start> to id 1"),
    (b'{"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 7}}', "contiguous"),
])
def test_bad_vocab_files(tmp_path, content, fragment):
    p = tmp_path / "vocab.json"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(InputError) as info:
        Vocab.load(p)
    msg = str(info.value)
    assert str(p) in msg and fragment in msg and "\n" not in msg
