"""The embedded default dataset: a seeded synthetic world in SCAN "precomp" layout.

Images come in *families*: a base image and ``family_size - 1`` siblings, each differing
from the base by ONE edit (attribute within its look-alike group, noun within its group,
attribute binding swap, relation flip, scene change). Siblings are the meaningful hard
negatives: their differences are carried by region features a pooled region encoder can
separate and by word order a GRU can read, yet random negatives never need them.

Everything is drawn from ``numpy.random.Generator`` streams keyed by (seed, split, purpose),
so the same config gives byte-identical files, and a split does not change when another
split's size changes. See docs/synthetic.md for the full description.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import CAPS_PER_IMAGE
from pipeline.errors import InputError
from pipeline.io import atomic_dir, open_memmap_out
from pipeline.options import rule_violation

SPLITS = ("train", "dev", "test")
EDIT_TYPES = ("attribute", "object", "binding", "relation", "scene")
MAX_OBJECTS = 4          # objects per image are 2..4 at most (pairs (0,1), (2,3) are related)
GRID = 3                 # objects sit on a 3x3 grid, one per cell

# ----------------------------------------------------------------------------- the world
# (canonical name, surface synonyms). Every canonical name is also a surface form.
NOUN_GROUPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "animal": [("dog", ("puppy",)), ("cat", ("kitten",)), ("horse", ("pony",)),
               ("cow", ()), ("sheep", ("lamb",)), ("goat", ())],
    "vehicle": [("car", ("automobile",)), ("truck", ("lorry",)), ("bus", ()),
                ("van", ("minivan",)), ("bicycle", ("bike",)), ("motorcycle", ("motorbike",))],
    "furniture": [("chair", ()), ("table", ()), ("bench", ()), ("sofa", ("couch",)),
                  ("bed", ()), ("desk", ())],
    "food": [("apple", ()), ("banana", ()), ("pizza", ()), ("cake", ()),
             ("sandwich", ()), ("donut", ("doughnut",))],
    "tableware": [("cup", ()), ("bowl", ()), ("plate", ("dish",)), ("bottle", ()),
                  ("vase", ()), ("mug", ())],
    "sports": [("ball", ()), ("racket", ("racquet",)), ("skateboard", ()),
               ("surfboard", ()), ("kite", ()), ("frisbee", ())],
    "instrument": [("guitar", ()), ("violin", ("fiddle",)), ("drum", ()), ("trumpet", ())],
}
ATTR_GROUPS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "warm colour": [("red", ()), ("orange", ()), ("yellow", ()), ("pink", ())],
    "cool colour": [("blue", ()), ("green", ()), ("purple", ())],
    "neutral colour": [("black", ()), ("white", ()), ("gray", ("grey",)), ("brown", ())],
    "size": [("small", ("little", "tiny")), ("large", ("big",))],
    "material": [("wooden", ("wood",)), ("metal", ("metallic",)), ("plastic", ())],
}
# scene -> (phrases placing the content in the scene, noun used in "a <noun> scene with ...")
SCENES: dict[str, tuple[tuple[str, ...], str]] = {
    "beach": (("on a beach", "at the beach", "on the sand by the sea"), "beach"),
    "park": (("in a park", "at the park", "in a public park"), "park"),
    "street": (("on a street", "on a city street", "on the road"), "street"),
    "kitchen": (("in a kitchen", "on a kitchen floor"), "kitchen"),
    "living room": (("in a living room", "in a lounge"), "living room"),
    "field": (("in a field", "on a grassy field", "in a meadow"), "field"),
    "forest": (("in a forest", "in the woods"), "forest"),
    "office": (("in an office", "at an office"), "office"),
    "garden": (("in a garden", "in a backyard"), "garden"),
    "snow": (("in the snow", "on a snowy hill"), "snow"),
}
# canonical relation (subject is the left / upper object) -> (forward wordings, inverse wordings)
# forward: "<subj> W <obj>"; inverse: "<obj> W <subj>" (states the same fact).
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "left of": (("to the left of", "left of", "on the left of"),
                ("to the right of", "right of", "on the right of")),
    "above": (("above", "over"), ("below", "under", "beneath")),
}
REL_NAMES = tuple(RELATIONS)  # axis 0 = horizontal ("left of"), axis 1 = vertical ("above")

NOUNS = [n for g in NOUN_GROUPS.values() for n, _ in g]
NOUN_GROUP = np.array([gi for gi, g in enumerate(NOUN_GROUPS.values()) for _ in g])
NOUN_WORDS = [(n, *syn) for g in NOUN_GROUPS.values() for n, syn in g]
ATTRS = [a for g in ATTR_GROUPS.values() for a, _ in g]
ATTR_GROUP = np.array([gi for gi, g in enumerate(ATTR_GROUPS.values()) for _ in g])
ATTR_WORDS = [(a, *syn) for g in ATTR_GROUPS.values() for a, syn in g]
SCENE_NAMES = list(SCENES)


def world_words() -> set[str]:
    """Every word the captions can use for nouns, attributes, scenes and relations."""
    words = {w for ws in NOUN_WORDS + ATTR_WORDS for p in ws for w in p.split()}
    words |= {w for phrases, noun in SCENES.values() for p in (*phrases, noun) for w in p.split()}
    words |= {w for fwd, inv in RELATIONS.values() for p in (*fwd, *inv) for w in p.split()}
    return words


# ----------------------------------------------------------------------------- config
@dataclass
class SyntheticConfig:
    n_train: int = 5000           # images per split; each a multiple of family_size
    n_dev: int = 1000
    n_test: int = 1000
    feature_dim: int = 256        # region feature width (2048 gives format parity with BUTD)
    n_regions: int = 36
    family_size: int = 5          # base image + (family_size - 1) single-edit siblings
    caption_mode: str = "full"    # "full": every caption states every fact; "varied": drops some
    noise: float = 0.3            # region noise, in code space (noise norm per code block ~ noise)
    seed: int = 0
    # difficulty knobs
    noun_lookalike: float = 0.7   # within-group offset of noun codes (smaller = look-alikes closer)
    attr_lookalike: float = 0.7   # within-group offset of attribute codes
    feature_noise: float = 0.05   # extra isotropic noise per feature dimension, after mixing
    quality_min: float = 0.5      # each region's code is scaled by U(quality_min, 1)
    position_jitter: float = 0.2  # std of an object region's position (grid cell units)
    embed_dim: int = 24           # width of each code block (noun, attribute, scene, ...)
    # region budget per image (the rest are scene/background regions)
    regions_per_object: int = 5
    regions_per_relation: int = 2
    clutter_regions: int = 3
    min_objects: int = 2
    max_objects: int = 4
    # edits: which kinds siblings get (distinct kinds within a family, drawn by weight)
    edit_types: tuple = EDIT_TYPES
    edit_weights: tuple | None = None   # one per edit type; None = equal weights
    drop_prob: float = 0.25       # "varied" captions: chance to drop a fact (scene, attribute, relation...)
    # chance a relation clause is worded inversely ("a dog to the right of a car"); inverse
    # wordings make relation direction an XOR of word order and relation word, which a
    # uni-GRU learns slowly: at 0.5 flips stay near chance even with sibling negatives
    inverse_relation_prob: float = 0.1

    def __post_init__(self):
        self.edit_types = tuple(self.edit_types)
        if self.edit_weights is None:
            self.edit_weights = (1.0,) * len(self.edit_types)
        self.edit_weights = tuple(float(w) for w in self.edit_weights)
        self.validate()

    def validate(self) -> None:
        def bad(problem):
            raise InputError("synthetic config", problem)

        kinds = {bool: "bool", int: "int", float: "float", str: "str"}
        for f in dataclasses.fields(self):
            kind = kinds.get(type(f.default))
            problem = kind and rule_violation(getattr(self, f.name), {"type": kind})
            if problem:
                bad(f"{f.name}={getattr(self, f.name)!r} {problem}")
        if self.seed < 0:
            bad(f"seed={self.seed} must be >= 0")

        if not isinstance(self.family_size, (int, np.integer)) or self.family_size < 1:
            bad(f"family_size must be an integer >= 1, got {self.family_size!r}")
        for name in ("n_train", "n_dev", "n_test"):
            n = getattr(self, name)
            if not isinstance(n, (int, np.integer)) or n <= 0 or n % self.family_size:
                bad(f"{name}={n} must be a positive multiple of family_size={self.family_size}")
        if self.caption_mode not in ("full", "varied"):
            bad(f"caption_mode must be 'full' or 'varied', got {self.caption_mode!r}")
        if not 2 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            bad(f"need 2 <= min_objects <= max_objects <= {MAX_OBJECTS}")
        unknown = set(self.edit_types) - set(EDIT_TYPES)
        if unknown or not self.edit_types or len(set(self.edit_types)) != len(self.edit_types):
            bad(f"edit_types must be distinct names from {list(EDIT_TYPES)}, got {list(self.edit_types)}")
        if len(self.edit_weights) != len(self.edit_types) or min(self.edit_weights) <= 0:
            bad("edit_weights needs one positive weight per edit type")
        if self.feature_dim < 1 or self.embed_dim < 2:
            bad("feature_dim must be >= 1 and embed_dim >= 2")
        need = (self.max_objects * self.regions_per_object
                + (self.max_objects // 2) * self.regions_per_relation + self.clutter_regions + 1)
        if self.regions_per_object < 1 or self.regions_per_relation < 0 or self.clutter_regions < 0:
            bad("region counts must be >= 0 (regions_per_object >= 1)")
        if self.n_regions < need:
            bad(f"n_regions={self.n_regions} too small: objects, relations and clutter need {need}")
        for name in ("noise", "noun_lookalike", "attr_lookalike", "feature_noise", "position_jitter"):
            if getattr(self, name) < 0:
                bad(f"{name} must be >= 0")
        if not 0 < self.quality_min <= 1:
            bad("quality_min must be in (0, 1]")
        if not 0 <= self.inverse_relation_prob <= 1:
            bad("inverse_relation_prob must be in [0, 1]")
        if not 0 <= self.drop_prob < 1:
            bad("drop_prob must be in [0, 1)")

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["edit_types"] = list(self.edit_types)
        d["edit_weights"] = list(self.edit_weights)
        return d


def _rng(cfg: SyntheticConfig, split: str, purpose: str) -> np.random.Generator:
    """An independent stream per (seed, split, purpose)."""
    key = [int(cfg.seed), *(ord(c) for c in split), 0, *(ord(c) for c in purpose)]
    return np.random.default_rng(np.random.SeedSequence(key))


# ----------------------------------------------------------------------------- scene graphs
@dataclass
class _Graphs:
    """Scene graphs of one split, as arrays over images in family-major order."""
    family: np.ndarray      # (N,)
    edit: np.ndarray        # (N,) index into ("base", *EDIT_TYPES)
    scene: np.ndarray       # (N,)
    n_obj: np.ndarray       # (N,)
    noun: np.ndarray        # (N, 4)
    attr: np.ndarray        # (N, 4)
    row: np.ndarray         # (N, 4)
    col: np.ndarray         # (N, 4)
    edited: list            # per image: edited object indices
    detail: list            # per image: {"from": ..., "to": ...} or None

    def relations(self):
        """rel_valid, subj, obj, axis: (N, 2) each; pair p relates objects 2p and 2p+1."""
        n = len(self.scene)
        valid = np.stack([self.n_obj >= 2, self.n_obj >= 4], axis=1)
        a = np.tile(np.array([0, 2]), (n, 1))
        b = a + 1
        ra, rb = np.take_along_axis(self.row, a, 1), np.take_along_axis(self.row, b, 1)
        ca, cb = np.take_along_axis(self.col, a, 1), np.take_along_axis(self.col, b, 1)
        dr, dc = rb - ra, cb - ca
        axis = (np.abs(dc) < np.abs(dr)).astype(np.int64)  # 0 horizontal, 1 vertical
        a_first = np.where(axis == 0, dc > 0, dr > 0)      # a is left of / above b
        subj = np.where(a_first, a, b)
        obj = np.where(a_first, b, a)
        return valid, subj, obj, axis


def _random_keys_argmax(rng, mask):
    """Uniform choice of a True column per row (rows without any True give column 0)."""
    keys = np.where(mask, rng.random(mask.shape), -1.0)
    return keys.argmax(axis=1)


def _sample_graphs(cfg: SyntheticConfig, n_img: int, rng: np.random.Generator) -> _Graphs:
    fs = cfg.family_size
    n_fam = n_img // fs
    n_nouns, n_attrs, n_scenes = len(NOUNS), len(ATTRS), len(SCENE_NAMES)
    # --- base images: distinct nouns, distinct attributes, distinct cells
    n_obj = rng.integers(cfg.min_objects, cfg.max_objects + 1, n_fam)
    noun = np.argsort(rng.random((n_fam, n_nouns)), axis=1)[:, :MAX_OBJECTS]
    attr = np.argsort(rng.random((n_fam, n_attrs)), axis=1)[:, :MAX_OBJECTS]
    cell = np.argsort(rng.random((n_fam, GRID * GRID)), axis=1)[:, :MAX_OBJECTS]
    scene = rng.integers(0, n_scenes, n_fam)
    # --- edit kinds per family: weighted draw without replacement (Gumbel top-k), cycled
    n_sib = fs - 1
    types = np.array([EDIT_TYPES.index(t) + 1 for t in cfg.edit_types])
    gumbel = -np.log(-np.log(rng.random((n_fam, len(types))) + 1e-300) + 1e-300)
    order = np.argsort(-(np.log(np.array(cfg.edit_weights))[None, :] + gumbel), axis=1)
    edit_fam = types[order[:, np.arange(n_sib) % len(types)]] if n_sib else np.zeros((n_fam, 0), int)
    edit = np.concatenate([np.zeros((n_fam, 1), np.int64), edit_fam], axis=1).reshape(-1)

    rep = lambda x: np.repeat(x, fs, axis=0).copy()  # noqa: E731
    g = _Graphs(family=np.repeat(np.arange(n_fam), fs), edit=edit, scene=rep(scene),
                n_obj=rep(n_obj), noun=rep(noun), attr=rep(attr), row=rep(cell // GRID),
                col=rep(cell % GRID), edited=[[] for _ in range(n_img)], detail=[None] * n_img)
    u = rng.random((n_img, 4))
    slot = np.arange(MAX_OBJECTS)[None, :]
    idx = lambda e: np.flatnonzero(g.edit == EDIT_TYPES.index(e) + 1)  # noqa: E731

    # attribute: one object's attribute -> another attribute of the same group
    rows = idx("attribute")
    if len(rows):
        j = (u[rows, 0] * g.n_obj[rows]).astype(int)
        old = g.attr[rows, j]
        mates = (ATTR_GROUP[None, :] == ATTR_GROUP[old][:, None]) & (np.arange(n_attrs)[None, :] != old[:, None])
        new = _random_keys_argmax(rng, mates)
        g.attr[rows, j] = new
        for r, jj, o, nw in zip(rows, j, old, new):
            g.edited[r] = [int(jj)]
            g.detail[r] = {"from": ATTRS[o], "to": ATTRS[nw]}
    # object: one object's noun -> another noun of its group not already in the image
    rows = idx("object")
    if len(rows):
        nouns, valid = g.noun[rows], slot < g.n_obj[rows, None]
        present = np.zeros((len(rows), n_nouns), bool)
        np.put_along_axis(present, np.where(valid, nouns, nouns[:, :1]), True, axis=1)
        same = NOUN_GROUP[None, None, :] == NOUN_GROUP[nouns][:, :, None]     # (r, 4, nouns)
        cand = same & ~present[:, None, :] & valid[:, :, None]
        has = cand.any(axis=2)
        j = _random_keys_argmax(rng, has)
        cj = cand[np.arange(len(rows)), j]
        none = ~has.any(axis=1)  # every object's group fully present (~1e-5): any absent noun
        cj[none] = ~present[none]
        old = nouns[np.arange(len(rows)), j]
        new = _random_keys_argmax(rng, cj)
        g.noun[rows, j] = new
        for r, jj, o, nw in zip(rows, j, old, new):
            g.edited[r] = [int(jj)]
            g.detail[r] = {"from": NOUNS[o], "to": NOUNS[nw]}
    # binding: swap the attributes of two objects (attributes are distinct in a base image)
    rows = idx("binding")
    if len(rows):
        n = g.n_obj[rows]
        i = (u[rows, 1] * n).astype(int)
        j = (i + 1 + (u[rows, 2] * (n - 1)).astype(int)) % n
        ai, aj = g.attr[rows, i].copy(), g.attr[rows, j].copy()
        g.attr[rows, i], g.attr[rows, j] = aj, ai
        for r, ii, jj in zip(rows, i, j):
            g.edited[r] = sorted([int(ii), int(jj)])
    # relation: swap the cells of a related pair (2p, 2p+1): the relation flips direction
    rows = idx("relation")
    if len(rows):
        p = (u[rows, 3] * (g.n_obj[rows] // 2)).astype(int)
        a, b = 2 * p, 2 * p + 1
        for arr in (g.row, g.col):
            va, vb = arr[rows, a].copy(), arr[rows, b].copy()
            arr[rows, a], arr[rows, b] = vb, va
        for r, aa in zip(rows, a):
            g.edited[r] = [int(aa), int(aa) + 1]
    # scene: any other scene
    rows = idx("scene")
    if len(rows):
        old = g.scene[rows]
        new = (old + 1 + (u[rows, 0] * (n_scenes - 1)).astype(int)) % n_scenes
        g.scene[rows] = new
        for r, o, nw in zip(rows, old, new):
            g.detail[r] = {"from": SCENE_NAMES[o], "to": SCENE_NAMES[nw]}
    return g


def _permute(g: _Graphs, perm: np.ndarray) -> _Graphs:
    return _Graphs(**{f.name: ([getattr(g, f.name)[i] for i in perm] if isinstance(getattr(g, f.name), list)
                               else getattr(g, f.name)[perm])
                      for f in dataclasses.fields(_Graphs)})


def obj_fact(attr: str, noun: str) -> str:
    return f"obj:{attr} {noun}"


def noun_fact(noun: str) -> str:
    return f"noun:{noun}"


def scene_fact(scene: str) -> str:
    return f"scene:{scene}"


# every relation wording -> (canonical relation, whether subject and object are exchanged)
REL_WORDINGS: dict[str, tuple[str, bool]] = {
    w: (canon, inverse) for canon, (fwd, inv) in RELATIONS.items()
    for inverse, ws in ((False, (canon, *fwd)), (True, inv)) for w in ws}
REL_WORDINGS.update({"right of": ("left of", True), "below": ("above", True)})


def rel_fact(subj: str, rel: str, obj: str) -> str:
    """Canonical fact of "<subj> <rel> <obj>"; inverse wordings give the same string.

    "dog to the right of car" and "car left of dog" both give "rel:car left of dog";
    "cup under lamp" gives "rel:lamp above cup".
    """
    try:
        canon, inverse = REL_WORDINGS[rel]
    except KeyError:
        raise ValueError(f"unknown relation wording {rel!r}") from None
    return f"rel:{obj} {canon} {subj}" if inverse else f"rel:{subj} {canon} {obj}"


# ----------------------------------------------------------------------------- captions
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Draws:
    """Pre-drawn uniforms consumed in order (keeps caption text independent of Python's RNG)."""
    __slots__ = ("u", "i")

    def __init__(self, u: list):
        self.u, self.i = u, 0

    def __call__(self) -> float:
        if self.i >= len(self.u):  # never expected: fall back deterministically
            self.i = 0
        v = self.u[self.i]
        self.i += 1
        return v

    def pick(self, seq):
        return seq[int(self() * len(seq))]


def _caption_text(objs, rels, scene, d: _Draws, varied: bool, drop: float, inverse_p: float):
    n = len(objs)
    keep_obj = [True] * n
    keep_attr = [True] * n
    keep_rel = [True] * len(rels)
    keep_scene = True
    if varied:
        keep_obj = [d() >= drop * 0.6 for _ in range(n)]
        if not any(keep_obj):
            keep_obj[int(d() * n)] = True
        keep_attr = [d() >= drop for _ in range(n)]
        keep_rel = [d() >= drop for _ in rels]
        keep_scene = d() >= drop
    facts = set()

    def phrase(k):
        noun, attr = objs[k]
        nw = d.pick(NOUN_WORDS[noun])
        facts.add(noun_fact(NOUNS[noun]))
        if keep_attr[k]:
            aw = d.pick(ATTR_WORDS[attr])
            facts.add(obj_fact(ATTRS[attr], NOUNS[noun]))
            return f"{_article(aw)} {aw} {nw}"
        return f"{_article(nw)} {nw}"

    units, related = [], set()
    for r, (s, axis, o) in enumerate(rels):
        related |= {s, o}
        if keep_obj[s] and keep_obj[o] and keep_rel[r]:
            fwd, inv = RELATIONS[REL_NAMES[axis]]
            if d() >= inverse_p:
                units.append(f"{phrase(s)} {d.pick(fwd)} {phrase(o)}")
            else:
                units.append(f"{phrase(o)} {d.pick(inv)} {phrase(s)}")
            facts.add(rel_fact(NOUNS[objs[s][0]], REL_NAMES[axis], NOUNS[objs[o][0]]))
        else:
            units.extend(phrase(k) for k in sorted((s, o)) if keep_obj[k])
    units.extend(phrase(k) for k in range(n) if k not in related and keep_obj[k])
    keys = [d() for _ in units]
    units = [u for _, u in sorted(zip(keys, units))]
    body = units[0] if len(units) == 1 else ", ".join(units[:-1]) + " and " + units[-1]
    if keep_scene:
        phrases, scene_noun = SCENES[SCENE_NAMES[scene]]
        where = d.pick(phrases)
        facts.add(scene_fact(SCENE_NAMES[scene]))
        t = int(d() * 6)
        text = (f"{body} {where}", f"{where}, {body}", f"there is {body} {where}",
                f"a photo of {body} {where}", f"{_article(scene_noun)} {scene_noun} scene with {body}",
                f"{body} can be seen {where}")[t]
    else:
        t = int(d() * 3)
        text = (body, f"there is {body}", f"a photo of {body}")[t]
    return text[0].upper() + text[1:] + ".", sorted(facts)


def _graph_records(g: _Graphs, cfg: SyntheticConfig, rng: np.random.Generator, id_offset: int):
    """Per-image JSON records, caption lines and caption facts, in row order."""
    valid, subj, obj, axis = g.relations()
    n_img = len(g.scene)
    draws = rng.random((n_img * CAPS_PER_IMAGE, 48)).tolist()
    varied = cfg.caption_mode == "varied"
    records, captions = [], []
    edit_names = ("base", *EDIT_TYPES)
    for i in range(n_img):
        n = int(g.n_obj[i])
        objs = [(int(g.noun[i, k]), int(g.attr[i, k])) for k in range(n)]
        rels = [(int(subj[i, p]), int(axis[i, p]), int(obj[i, p])) for p in range(2) if valid[i, p]]
        sc = int(g.scene[i])
        facts = {scene_fact(SCENE_NAMES[sc])}
        for nn, aa in objs:
            facts |= {noun_fact(NOUNS[nn]), obj_fact(ATTRS[aa], NOUNS[nn])}
        for s, ax, o in rels:
            facts.add(rel_fact(NOUNS[objs[s][0]], REL_NAMES[ax], NOUNS[objs[o][0]]))
        cap_facts = []
        for c in range(CAPS_PER_IMAGE):
            text, cf = _caption_text(objs, rels, sc, _Draws(draws[i * CAPS_PER_IMAGE + c]),
                                     varied, cfg.drop_prob, cfg.inverse_relation_prob)
            captions.append(text)
            cap_facts.append(cf)
        rec = {"image": i, "id": id_offset + i, "family": int(g.family[i]),
               "edit": edit_names[int(g.edit[i])], "edited_objects": g.edited[i],
               "scene": SCENE_NAMES[sc],
               "objects": [{"noun": NOUNS[nn], "attr": ATTRS[aa],
                            "pos": [int(g.row[i, k]), int(g.col[i, k])]}
                           for k, (nn, aa) in enumerate(objs)],
               "relations": [[s, REL_NAMES[ax], o] for s, ax, o in rels],
               "facts": sorted(facts), "caption_facts": cap_facts}
        if g.detail[i] is not None:
            rec["edit_detail"] = g.detail[i]
        records.append(rec)
    return records, captions


# ----------------------------------------------------------------------------- features
@dataclass
class _World:
    noun: np.ndarray      # (n_nouns, k) unit codes: group centroid + lookalike * offset
    attr: np.ndarray      # (n_attrs, k)
    scene: np.ndarray     # (n_scenes, k)
    pos_proj: np.ndarray  # (6, k) position code -> noun-sized block for the noun (.) position product
    mix: np.ndarray       # (code_dim, feature_dim)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _lookalike(rng, groups: np.ndarray, k: int, offset: float) -> np.ndarray:
    centroids = _unit(rng.standard_normal((groups.max() + 1, k)))
    offsets = _unit(rng.standard_normal((len(groups), k)))
    return _unit(centroids[groups] + offset * offsets)


# region code layout: noun | attr | pos(6) | noun*attr | noun*pos | scene | union (S_h O_h S_v O_v) | type(4)
_BLOCK_WIDTHS = (("noun", 1, 0), ("attr", 1, 0), ("pos", 0, 6), ("noun*attr", 1, 0), ("noun*pos", 1, 0),
                 ("scene", 1, 0), ("union", 4, 0), ("type", 0, 4))  # (name, multiples of k, fixed)


def _code_blocks(k: int) -> list[slice]:
    out, start = [], 0
    for _, mult, fixed in _BLOCK_WIDTHS:
        out.append(slice(start, start + mult * k + fixed))
        start = out[-1].stop
    return out


def _code_dim(k: int) -> int:
    return _code_blocks(k)[-1].stop


def _make_world(cfg: SyntheticConfig) -> _World:
    rng = _rng(cfg, "world", "codes")
    k = cfg.embed_dim
    noun = _lookalike(rng, NOUN_GROUP, k, cfg.noun_lookalike)
    attr = _lookalike(rng, ATTR_GROUP, k, cfg.attr_lookalike)
    scene = _unit(rng.standard_normal((len(SCENE_NAMES), k)))
    pos_proj = rng.standard_normal((6, k))
    # typical object-region code has ~5 unit-norm blocks: scale so features have ~unit RMS
    mix = rng.standard_normal((_code_dim(k), cfg.feature_dim)) / np.sqrt(5.0 + 10 * cfg.noise ** 2)
    f32 = np.float32
    return _World(noun.astype(f32), attr.astype(f32), scene.astype(f32), pos_proj.astype(f32), mix.astype(f32))


def _pos_code(rc: np.ndarray) -> np.ndarray:
    """Smooth code of (row, col) positions in grid units: 3 Gaussian bumps per axis. (..., 2) -> (..., 6)."""
    centres = np.arange(GRID, dtype=rc.dtype)
    z = rc[..., :, None] - centres  # (..., 2, 3)
    return np.exp(-0.5 * (z / rc.dtype.type(0.6)) ** 2).reshape(*rc.shape[:-1], 2 * GRID)


def _slot_template(cfg: SyntheticConfig):
    """Static region slots: (type, ref). type 0 object, 1 union, 2 clutter, 3 scene."""
    types, refs = [], []
    for o in range(MAX_OBJECTS):
        types += [0] * cfg.regions_per_object
        refs += [o] * cfg.regions_per_object
    for p in range(MAX_OBJECTS // 2):
        types += [1] * cfg.regions_per_relation
        refs += [p] * cfg.regions_per_relation
    types += [2] * cfg.clutter_regions
    refs += list(range(cfg.clutter_regions))
    rest = cfg.n_regions - len(types)
    types += [3] * rest
    refs += list(range(rest))
    return np.array(types), np.array(refs)


def _features_chunk(g: _Graphs, rows: np.ndarray, world: _World, cfg: SyntheticConfig,
                    rng: np.random.Generator) -> np.ndarray:
    k, R = cfg.embed_dim, cfg.n_regions
    n = len(rows)
    n_obj, noun, attr = g.n_obj[rows], g.noun[rows], g.attr[rows]
    valid, subj, obj, axis = g.relations()
    valid, subj, obj, axis = valid[rows], subj[rows], obj[rows], axis[rows]
    stype, sref = _slot_template(cfg)
    typ = np.broadcast_to(stype, (n, R)).copy()
    ref = np.broadcast_to(sref, (n, R)).copy()
    oref = np.minimum(ref, MAX_OBJECTS - 1)
    pref = np.minimum(ref, 1)
    dead = ((typ == 0) & (oref >= n_obj[:, None])) | ((typ == 1) & ~np.take_along_axis(valid, pref, 1))
    typ[dead] = 3
    is_obj, is_uni, is_clu, is_scn = (typ == t for t in range(4))

    f32 = np.float32
    code = np.zeros((n, R, _code_dim(k)), f32)
    NOUN, ATTR, POS, NA, NP, SCN, UNI, TYP = _code_blocks(k)

    # objects: noun, attribute, jittered position, bound products
    nn = np.take_along_axis(noun, oref, 1)
    aa = np.take_along_axis(attr, oref, 1)
    rc = np.stack([np.take_along_axis(g.row[rows], oref, 1), np.take_along_axis(g.col[rows], oref, 1)], -1)
    rc = rc + cfg.position_jitter * rng.standard_normal(rc.shape, dtype=f32)
    pc = _pos_code(rc)
    pp = _unit(pc @ world.pos_proj)
    ne, ae = world.noun[nn], world.attr[aa]
    m = is_obj[..., None]
    code[..., NOUN] = ne * m
    code[..., ATTR] = ae * m
    code[..., NA] = np.sqrt(k) * ne * ae * m
    code[..., NP] = np.sqrt(k) * ne * pp * m
    # unions: subject noun and object noun in the blocks of the relation's axis, midpoint position
    si = np.take_along_axis(subj, pref, 1)
    oi = np.take_along_axis(obj, pref, 1)
    ax = np.take_along_axis(axis, pref, 1)
    sn, on = np.take_along_axis(noun, si, 1), np.take_along_axis(noun, oi, 1)
    uni = np.zeros((n, R, 2, 2, k), f32)
    onehot = (ax[..., None] == np.arange(2))[..., None]
    uni[:, :, :, 0] = world.noun[sn][:, :, None, :] * onehot
    uni[:, :, :, 1] = world.noun[on][:, :, None, :] * onehot
    code[..., UNI] = uni.reshape(n, R, 4 * k) * is_uni[..., None]
    rs = np.stack([np.take_along_axis(g.row[rows], si, 1), np.take_along_axis(g.col[rows], si, 1)], -1)
    ro = np.stack([np.take_along_axis(g.row[rows], oi, 1), np.take_along_axis(g.col[rows], oi, 1)], -1)
    code[..., POS] = np.where(is_obj[..., None], pc, _pos_code(0.5 * (rs + ro)) * is_uni[..., None])
    # scene / background regions
    code[..., SCN] = world.scene[g.scene[rows]][:, None, :] * is_scn[..., None]
    # clutter: random object-like content
    clutter = rng.standard_normal((n, R, 3 * k), dtype=f32) / f32(np.sqrt(k))
    code[..., NOUN] += clutter[..., :k] * is_clu[..., None]
    code[..., ATTR] += clutter[..., k:2 * k] * is_clu[..., None]
    code[..., NA] += clutter[..., 2 * k:] * is_clu[..., None]
    code[..., TYP] = (typ[..., None] == np.arange(4)) * 0.5
    # region quality, code-space noise, mixing, feature noise
    code *= rng.uniform(cfg.quality_min, 1.0, (n, R, 1)).astype(f32)
    code += f32(cfg.noise / np.sqrt(k)) * rng.standard_normal(code.shape, dtype=f32)
    feats = code.reshape(n * R, -1) @ world.mix
    feats += f32(cfg.feature_noise) * rng.standard_normal(feats.shape, dtype=f32)
    feats = feats.reshape(n, R, -1)
    # shuffle region order within each image
    order = np.argsort(rng.random((n, R)), axis=1)
    return np.take_along_axis(feats, order[..., None], 1)


# ----------------------------------------------------------------------------- generate
def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[synthetic] {msg}", file=sys.stderr, flush=True)


def generate(out_dir: str | Path, config: SyntheticConfig | None = None, progress: bool = True) -> dict:
    """Write the dataset atomically into `out_dir` and return summary stats (JSON-serialisable)."""
    from pipeline.data.vocab import build_vocab, tokenize

    cfg = config if config is not None else SyntheticConfig()
    cfg.validate()
    t0 = time.perf_counter()
    world = _make_world(cfg)
    sizes = cfg.split_sizes()
    offsets = {"train": 0, "dev": sizes["train"], "test": sizes["train"] + sizes["dev"]}
    stats = {"splits": {}}
    all_caps = {}
    chunk = int(np.clip(2 ** 24 // (cfg.n_regions * cfg.feature_dim), 64, 1024))  # ~64 MiB of float32 per chunk
    with atomic_dir(out_dir, "prepare-data") as tmp:
        for split in SPLITS:
            n_img = sizes[split]
            g = _sample_graphs(cfg, n_img, _rng(cfg, split, "graphs"))
            g = _permute(g, _rng(cfg, split, "order").permutation(n_img))
            records, captions = _graph_records(g, cfg, _rng(cfg, split, "captions"), offsets[split])
            _log(progress, f"{split}: {n_img} images, {len(captions)} captions")
            feats = open_memmap_out(tmp / f"{split}_ims.npy", np.float32,
                                    (n_img, cfg.n_regions, cfg.feature_dim))
            frng = _rng(cfg, split, "features")
            for s in range(0, n_img, chunk):
                rows = np.arange(s, min(s + chunk, n_img))
                feats[rows[0]:rows[-1] + 1] = _features_chunk(g, rows, world, cfg, frng)
            feats.flush()
            del feats
            (tmp / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
            (tmp / f"{split}_ids.txt").write_text("\n".join(str(r["id"]) for r in records) + "\n")
            with open(tmp / f"{split}_graphs.jsonl", "w") as f:
                for r in records:
                    f.write(json.dumps(r, separators=(",", ":")) + "\n")
            all_caps[split] = captions
            edits = {}
            for r in records:
                edits[r["edit"]] = edits.get(r["edit"], 0) + 1
            n_cap_facts = [len(cf) for r in records for cf in r["caption_facts"]]
            n_facts = [len(r["facts"]) for r in records]
            stats["splits"][split] = {
                "images": n_img, "captions": len(captions), "families": n_img // cfg.family_size,
                "edits": dict(sorted(edits.items())),
                "mean_objects": round(float(np.mean(g.n_obj)), 4),
                "mean_caption_tokens": round(float(np.mean([len(tokenize(c)) for c in captions])), 4),
                "mean_image_facts": round(float(np.mean(n_facts)), 4),
                "mean_caption_facts": round(float(np.mean(n_cap_facts)), 4),
                "ids": [offsets[split], offsets[split] + n_img - 1],
            }
        vocab = build_vocab(all_caps["train"] + all_caps["dev"], threshold=4)
        vocab.save(tmp / "vocab.json")
        stats.update({
            "dataset": "synthetic", "vocab_size": len(vocab),
            "feature_shape": [cfg.n_regions, cfg.feature_dim], "captions_per_image": CAPS_PER_IMAGE,
            "world": {"nouns": {gname: [n for n, _ in ws] for gname, ws in NOUN_GROUPS.items()},
                      "attributes": {gname: [a for a, _ in ws] for gname, ws in ATTR_GROUPS.items()},
                      "scenes": SCENE_NAMES, "relations": list(REL_NAMES)},
        })
        meta = {"dataset": "synthetic", "config": cfg.to_dict(), "stats": stats}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    out = dict(stats)
    out["config"] = cfg.to_dict()
    out["out_dir"] = str(Path(out_dir))
    out["generation_seconds"] = round(time.perf_counter() - t0, 3)
    _log(progress, f"done in {out['generation_seconds']} s -> {out_dir}")
    return out
