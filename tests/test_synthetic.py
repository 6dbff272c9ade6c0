"""The embedded synthetic dataset: layout, determinism, families, facts, vocab, atomicity."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from pipeline.io import STAMP
from pipeline.data import scene_graphs as sg
from pipeline.data import synthetic as syn
from pipeline.data.synthetic import SyntheticConfig, generate, rel_fact
from pipeline.data.vocab import Vocab, tokenize
from pipeline.errors import InputError

SPLITS = ("train", "dev", "test")
SMALL = dict(n_train=50, n_dev=25, n_test=25, feature_dim=32)


def small(**kw) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    summary = generate(out, small(), progress=False)
    return out, summary


@pytest.fixture(scope="module")
def data_varied(tmp_path_factory):
    out = tmp_path_factory.mktemp("synv") / "data"
    generate(out, small(caption_mode="varied", n_train=100), progress=False)
    return out


def read_caps(path):
    return path.read_text().split("\n")[:-1]  # file ends with one newline


# ----------------------------------------------------------------------------- layout
def test_layout_shapes_and_dtypes(data):
    out, summary = data
    cfg = small()
    names = {p.name for p in out.iterdir()}
    for split in SPLITS:
        assert {f"{split}_ims.npy", f"{split}_caps.txt", f"{split}_ids.txt", f"{split}_graphs.jsonl"} <= names
    assert {"vocab.json", "dataset.json"} <= names
    assert not [n for n in names if n.startswith(".") and n != STAMP]   # no temp files
    all_ids = []
    for split, n in cfg.split_sizes().items():
        ims = np.load(out / f"{split}_ims.npy")
        assert ims.dtype == np.float32 and ims.shape == (n, 36, 32)
        assert np.isfinite(ims).all() and ims.std() > 0.1
        caps = read_caps(out / f"{split}_caps.txt")
        assert len(caps) == 5 * n and all(c.strip() for c in caps)
        ids = (out / f"{split}_ids.txt").read_text().split()
        assert len(ids) == n
        all_ids += [int(i) for i in ids]
        graphs = sg.load_graphs(out, split)
        assert len(graphs) == n and [g["image"] for g in graphs] == list(range(n))
        assert [g["id"] for g in graphs] == [int(i) for i in ids]
        assert summary["splits"][split]["images"] == n
    assert len(set(all_ids)) == len(all_ids)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["config"]["n_train"] == 50 and meta["stats"]["vocab_size"] == summary["vocab_size"]
    assert sum(meta["stats"]["splits"]["train"]["edits"].values()) == 50
    json.dumps(summary)  # JSON-serialisable


def test_regions_are_shuffled_and_distinct(data):
    out, _ = data
    ims = np.load(out / "train_ims.npy")
    # no two images share a region layout: the first region of each image differs in kind
    # (objects, unions, scene, clutter): its distance to the image's mean varies a lot
    first = np.linalg.norm(ims[:, 0] - ims.mean(1), axis=1)
    assert first.std() > 0.05 * first.mean()
    assert not np.allclose(ims[0], ims[1])


# ----------------------------------------------------------------------------- determinism
def test_same_seed_identical_bytes_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cfg = dict(n_train=25, n_dev=10, n_test=10, feature_dim=16)
    generate(a, SyntheticConfig(**cfg), progress=False)
    generate(b, SyntheticConfig(**cfg), progress=False)
    generate(c, SyntheticConfig(**cfg, seed=1), progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    for n in ("train_ims.npy", "train_caps.txt", "test_graphs.jsonl"):
        assert (a / n).read_bytes() != (c / n).read_bytes(), n


def test_split_independent_of_other_split_sizes(tmp_path):
    generate(tmp_path / "a", small(), progress=False)
    generate(tmp_path / "b", small(n_train=100), progress=False)
    for n in ("test_ims.npy", "test_caps.txt"):
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes()
    ga, gb = sg.load_graphs(tmp_path / "a", "test"), sg.load_graphs(tmp_path / "b", "test")
    assert [g["id"] for g in gb] == [g["id"] + 50 for g in ga]  # ids run on across splits
    assert [{**g, "id": 0} for g in ga] == [{**g, "id": 0} for g in gb]


# ----------------------------------------------------------------------------- families
def _objects_in(fact):
    """Canonical nouns a fact mentions."""
    kind, body = fact.split(":", 1)
    if kind == "obj":
        return {body.split(" ", 1)[1]}
    if kind == "noun":
        return {body}
    if kind == "rel":
        for rel in syn.RELATIONS:
            if f" {rel} " in body:
                s, o = body.split(f" {rel} ")
                return {s, o}
    return set()


def test_families_and_single_edits(data):
    out, _ = data
    for split in SPLITS:
        graphs = sg.load_graphs(out, split)
        fam = sg.family_ids(graphs)
        members = defaultdict(list)
        for i, f in enumerate(fam):
            members[int(f)].append(i)
        assert sorted(members) == list(range(len(graphs) // 5))
        for f, idx in members.items():
            edits = sorted(graphs[i]["edit"] for i in idx)
            assert len(idx) == 5 and edits.count("base") == 1
            assert len(set(edits)) == 5 and set(edits) - {"base"} <= set(syn.EDIT_TYPES)
        pairs = sg.sibling_pairs(graphs)
        assert len(pairs) == 4 * len(members)
        for b, e, kind in pairs:
            gb, ge = graphs[b], graphs[e]
            fb, fe = set(gb["facts"]), set(ge["facts"])
            removed, added = fb - fe, fe - fb
            assert removed and added, (kind, gb, ge)
            edited = set(ge["edited_objects"])
            nb, ne = [o["noun"] for o in gb["objects"]], [o["noun"] for o in ge["objects"]]
            if kind == "scene":
                assert removed == {f"scene:{gb['scene']}"} and added == {f"scene:{ge['scene']}"}
                assert gb["objects"] == ge["objects"]
                continue
            assert gb["scene"] == ge["scene"]
            # only facts about the edited objects change; the other objects are untouched
            touched = {nb[k] for k in edited} | {ne[k] for k in edited}
            for fct in removed | added:
                assert fct.startswith(("obj:", "noun:", "rel:")) and _objects_in(fct) & touched, (kind, fct)
            for k in set(range(len(nb))) - edited:
                assert gb["objects"][k] == ge["objects"][k]
            if kind == "attribute":
                (k,) = edited
                ob, oe = gb["objects"][k], ge["objects"][k]
                assert ob["noun"] == oe["noun"] and ob["attr"] != oe["attr"]
                assert syn.ATTR_GROUP[syn.ATTRS.index(ob["attr"])] == syn.ATTR_GROUP[syn.ATTRS.index(oe["attr"])]
                assert len(removed) == len(added) == 1
            elif kind == "object":
                (k,) = edited
                ob, oe = gb["objects"][k], ge["objects"][k]
                assert ob["attr"] == oe["attr"] and ob["noun"] != oe["noun"] and oe["noun"] not in nb
                assert syn.NOUN_GROUP[syn.NOUNS.index(ob["noun"])] == syn.NOUN_GROUP[syn.NOUNS.index(oe["noun"])]
            elif kind == "binding":
                i, j = sorted(edited)
                assert gb["objects"][i]["attr"] == ge["objects"][j]["attr"]
                assert gb["objects"][j]["attr"] == ge["objects"][i]["attr"]
                assert {f.split(":")[0] for f in removed | added} == {"obj"} and len(removed) == 2
            elif kind == "relation":
                assert len(removed) == len(added) == 1
                (r,), (a,) = removed, added
                assert r.startswith("rel:") and a.startswith("rel:") and _objects_in(r) == _objects_in(a)
                assert [o["pos"] for o in gb["objects"]] != [o["pos"] for o in ge["objects"]]


def test_family_members_are_spread(data):
    out, _ = data
    fam = sg.family_ids(sg.load_graphs(out, "train"))
    same_adjacent = np.mean(fam[1:] == fam[:-1])
    assert same_adjacent < 0.3
    spans = [np.ptp(np.flatnonzero(fam == f)) for f in np.unique(fam)]
    assert np.mean(spans) > 10  # contiguous families would span 4 rows


def test_relation_geometry(data):
    out, _ = data
    for g in sg.load_graphs(out, "train"):
        objs = g["objects"]
        assert 2 <= len(objs) <= 4
        assert len({tuple(o["pos"]) for o in objs}) == len(objs)
        assert len(g["relations"]) == len(objs) // 2
        for s, rel, o in g["relations"]:
            assert {s, o} in ({0, 1}, {2, 3})
            (rs, cs), (ro, co) = objs[s]["pos"], objs[o]["pos"]
            if abs(co - cs) >= abs(ro - rs):
                assert rel == "left of" and cs < co
            else:
                assert rel == "above" and rs < ro
            assert rel_fact(objs[s]["noun"], rel, objs[o]["noun"]) in g["facts"]


# ----------------------------------------------------------------------------- facts
def test_caption_facts_hold_for_own_image(data, data_varied):
    out, _ = data
    for d, mode in ((out, "full"), (data_varied, "varied")):
        graphs = sg.load_graphs(d, "train")
        n_facts = []
        for i, g in enumerate(graphs):
            for c, cf in enumerate(g["caption_facts"]):
                assert cf == sorted(cf) and cf
                assert sg.describes(cf, g["facts"])
                assert sg.caption_describes_image(graphs, 5 * i + c, i)
                n_facts.append(len(cf) / len(g["facts"]))
                if mode == "full":
                    assert set(cf) == set(g["facts"])
        if mode == "varied":
            assert 0.4 < np.mean(n_facts) < 0.95


def test_sibling_captions_do_not_describe_each_other(data):
    out, _ = data
    graphs = sg.load_graphs(out, "dev")
    for b, e, _ in sg.sibling_pairs(graphs):
        for c in range(5):
            assert not sg.caption_describes_image(graphs, 5 * b + c, e)
            assert not sg.caption_describes_image(graphs, 5 * e + c, b)
    mask = sg.false_negative_mask(graphs, 0, range(5 * len(graphs)))
    assert mask.shape == (5 * len(graphs),) and not mask[:5].any()


def test_inverse_relation_wording_maps_to_same_fact():
    assert rel_fact("dog", "to the right of", "car") == rel_fact("car", "left of", "dog") == "rel:car left of dog"
    assert rel_fact("dog", "right of", "car") == rel_fact("car", "on the left of", "dog")
    assert rel_fact("cup", "below", "lamp") == rel_fact("lamp", "above", "cup") == "rel:lamp above cup"
    assert rel_fact("cup", "under", "lamp") == rel_fact("cup", "beneath", "lamp") == rel_fact("lamp", "over", "cup")
    with pytest.raises(ValueError):
        rel_fact("a", "near", "b")


def _parse_relation(caption: str):
    """(noun before, wording, noun after) of the relation clause of a 2-object caption."""
    surface = {w: n for n, ws in zip(syn.NOUNS, syn.NOUN_WORDS) for w in ws}
    text = " " + " ".join(tokenize(caption)) + " "
    wordings = sorted(syn.REL_WORDINGS, key=len, reverse=True)
    for w in wordings:
        at = text.find(f" {w} ")
        if at >= 0:
            before, after = text[:at].split(), text[at + len(w) + 2:].split()
            nb = [surface[t] for t in before if t in surface][-1]
            na = [surface[t] for t in after if t in surface][0]
            return nb, w, na
    raise AssertionError(f"no relation wording in {caption!r}")


@pytest.mark.parametrize("inverse", [0.0, 1.0])
def test_caption_text_matches_relation_fact(tmp_path, inverse):
    out = tmp_path / "d"
    generate(out, small(inverse_relation_prob=inverse, min_objects=2, max_objects=2), progress=False)
    graphs = sg.load_graphs(out, "train")
    caps = read_caps(out / "train_caps.txt")
    inverse_words = {w for w, (_, inv) in syn.REL_WORDINGS.items() if inv}
    for i, g in enumerate(graphs):
        (rel,) = [f for f in g["facts"] if f.startswith("rel:")]
        for c in range(5):
            before, wording, after = _parse_relation(caps[5 * i + c])
            assert rel_fact(before, wording, after) == rel
            assert (wording in inverse_words) == (inverse == 1.0)


def test_articles(data):
    out, _ = data
    toks = tokenize(" ".join(read_caps(out / "train_caps.txt")))
    assert "an" in toks
    for a, w in zip(toks, toks[1:]):
        if a in ("a", "an"):
            assert (a == "an") == (w[0] in "aeiou"), (a, w)


# ----------------------------------------------------------------------------- vocab
def test_vocab_contains_world_words(tmp_path):
    out = tmp_path / "v"
    generate(out, SyntheticConfig(n_train=1500, n_dev=50, n_test=5, feature_dim=8), progress=False)
    vocab = Vocab.load(out / "vocab.json")
    missing = sorted(w for w in syn.world_words() if w not in vocab)
    assert not missing
    for w in ("dog", "puppy", "red", "grey", "beach", "left", "right", "above", "beneath", "an", "."):
        assert w in vocab
    caps = read_caps(out / "train_caps.txt") + read_caps(out / "dev_caps.txt")
    counts = Counter(t for c in caps for t in tokenize(c))
    assert all(counts[w] >= 4 for w in vocab.word2idx if not w.startswith("<"))
    assert len(vocab) == json.loads((out / "dataset.json").read_text())["stats"]["vocab_size"]


# ----------------------------------------------------------------------------- atomicity, config
def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = syn._features_chunk

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(syn, "_features_chunk", boom)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "out", small(), progress=False)
    assert list(tmp_path.iterdir()) == []
    # an existing dataset survives a failed regeneration
    monkeypatch.setattr(syn, "_features_chunk", real)
    generate(tmp_path / "out", small(), progress=False)
    before = (tmp_path / "out" / "train_caps.txt").read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(syn, "_features_chunk", boom)
    with pytest.raises(RuntimeError):
        generate(tmp_path / "out", small(seed=3), progress=False)
    assert (tmp_path / "out" / "train_caps.txt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("kw", [dict(n_train=52), dict(n_dev=0), dict(caption_mode="terse"),
                                dict(n_regions=10), dict(edit_types=("colour",)), dict(noise=-1),
                                dict(max_objects=5)])
def test_bad_config(kw):
    with pytest.raises(InputError):
        small(**kw)


def test_config_accepts_lists_from_yaml():
    cfg = small(edit_types=["attribute", "scene"], edit_weights=[1, 2], family_size=3, n_train=30, n_dev=3, n_test=3)
    assert cfg.edit_types == ("attribute", "scene") and cfg.to_dict()["edit_weights"] == [1.0, 2.0]


def test_family_size_and_edit_subset(tmp_path):
    out = tmp_path / "f"
    generate(out, SyntheticConfig(n_train=30, n_dev=3, n_test=3, feature_dim=8, family_size=3,
                                  edit_types=("binding", "relation")), progress=False)
    graphs = sg.load_graphs(out, "train")
    assert Counter(sg.edit_types(graphs)) == {"base": 10, "binding": 10, "relation": 10}


# ----------------------------------------------------------------------------- scene_graphs errors
def test_load_graphs_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        sg.load_graphs(tmp_path, "train")
    (tmp_path / "train_graphs.jsonl").write_text("{not json}\n")
    with pytest.raises(InputError, match="line 1"):
        sg.load_graphs(tmp_path, "train")
    (tmp_path / "train_graphs.jsonl").write_text(json.dumps({"image": 0, "family": 0}) + "\n")
    with pytest.raises(InputError, match="missing"):
        sg.load_graphs(tmp_path, "train")
    rec = {"image": 1, "family": 0, "edit": "base", "facts": [], "caption_facts": [[]] * 5}
    (tmp_path / "train_graphs.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(InputError, match="order"):
        sg.load_graphs(tmp_path, "train")


def test_describes():
    assert sg.describes(["obj:red car"], ["obj:red car", "scene:beach"])
    assert not sg.describes(["obj:red car", "scene:park"], ["obj:red car", "scene:beach"])
    assert sg.describes([], ["scene:beach"])
