"""DVC stage `evaluate_*`: score a checkpoint on a split under a protocol.

On the embedded dataset (a `{split}_graphs.jsonl` beside the features) it also measures
retrieval among the image's own family only (the hard negatives the generator planted)
against random groups of the same size, and pairwise accuracy per edit type.

Cross models may write the whole score matrix resumably (`sims`: pipeline.evaluation.
sims_file) or be evaluated in two stages (`shortlist`, `shortlist_k`: pipeline.evaluation.
two_stage, docs/two_stage.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.errors import InputError
from pipeline.evaluation.protocols import evaluate_sims, load_sims
from pipeline.io import refuse_overlap, write_json
from pipeline.scoring import encode_gallery

SECTION = "evaluate_base"


def run(*, checkpoint, data_dir, split: str = "test", protocol: str = "full",
        out_json=None, groups_json=None, device: str = "cpu", batch_size: int = 128,
        sims=None, shortlist=None, shortlist_k=None, sims_block_rows: int | None = None,
        kill_after_blocks: int | None = None, progress: bool = True) -> dict:
    """Metrics of `checkpoint` on `split` under `protocol`.

    sims: also write the whole (n_img, n_cap) float32 matrix to this .npy, resumably
    (pipeline.evaluation.sims_file), and take the metrics from it (what `evaluate-sims`
    reads). shortlist / shortlist_k: a two-stage evaluation of a cross model
    (pipeline.evaluation.two_stage): the first stage from an `embed` folder or an
    independent checkpoint, its top shortlist_k (default 100) re-scored."""
    from pipeline.evaluation import sims_file, two_stage
    from pipeline.options import check_values
    from stages.params_schema import evaluate_section

    check_values({"split": split, "protocol": protocol, "batch_size": batch_size, "sims": _str(sims),
                  "shortlist": _str(shortlist), "shortlist_k": shortlist_k}, evaluate_section(), "evaluate")
    if sims_block_rows is not None:
        check_values({"sims_block_rows": sims_block_rows}, {"sims_block_rows": {"type": "int", "min": 1}},
                     "evaluate")
    if sims and shortlist:
        raise InputError(None, "--sims writes the full matrix and --shortlist avoids it: give one of them")
    if shortlist_k is not None and not shortlist:
        raise InputError(None, "shortlist_k needs a shortlist source (--shortlist)")
    for out in (out_json, groups_json):     # a metrics file never lands on an input
        if out:
            refuse_overlap(out, [checkpoint, data_dir, shortlist])
    if sims:
        refuse_overlap(sims, [checkpoint, data_dir])
        for out in (out_json, groups_json):
            if out and Path(out).resolve() in (Path(sims).resolve(),
                                               sims_file.sidecar_path(sims).resolve()):
                raise InputError(out, f"is the --sims file or its sidecar: choose another path")
    model, cfg = load_checkpoint(checkpoint, device, data_dir=data_dir)
    data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
    if shortlist:
        # the first stage first: a bad source is refused before the cross encoding
        first_img, first_cap, info = two_stage.load_shortlist_rows(
            shortlist, split=split, data_dir=data_dir, n_img=data.n_images, n_cap=data.n_captions,
            device=device, batch_size=batch_size, progress=progress, data=data)
    gallery = encode_gallery(model, data, batch_size=batch_size, device=device,
                             progress=progress, source=checkpoint)  # refuses NaN / zero rows
    matrix = None
    graphs_file = Path(data_dir) / f"{split}_graphs.jsonl"
    want_groups = graphs_file.exists()
    if shortlist:
        metrics = two_stage.evaluate_two_stage(
            gallery, first_img, first_cap, protocol,
            two_stage.DEFAULT_K if shortlist_k is None else shortlist_k,
            source=checkpoint, progress=progress)
        metrics.update(info)
    elif sims:
        ident = sims_file.identity(checkpoint=checkpoint, data_dir=data_dir, split=split,
                                   n_img=gallery.n_img, n_cap=gallery.n_cap,
                                   model=cfg["model"].get("name", getattr(model, "name", "")))
        done = sims_file.write_sims(gallery.block, sims, ident, source=checkpoint, progress=progress,
                                    block_rows=sims_block_rows or sims_file.DEFAULT_BLOCK_ROWS,
                                    kill_after_blocks=kill_after_blocks)
        matrix = load_sims(sims)            # validated: shape, finite
        metrics = evaluate_sims(matrix, protocol, source=str(sims))
        metrics["sims"] = str(sims)
        metrics["sims_blocks_computed"] = done["blocks_computed"]
    elif want_groups:
        metrics, matrix = gallery.evaluate_and_matrix(protocol, source=checkpoint)
    else:
        metrics = gallery.evaluate(protocol)
    if out_json:
        write_json(out_json, metrics)
    result = {"metrics": metrics}
    if want_groups:
        # two-stage: no full matrix; the entries the family metrics read are scored alone
        result["groups"] = family_evaluation(data_dir, split, np.asarray(matrix) if matrix is not None
                                             else None, gallery=gallery, source=checkpoint)
        if groups_json:
            write_json(groups_json, result["groups"])
    return result


def _str(path):
    return None if path is None else str(path)


def family_evaluation(data_dir, split, sims: np.ndarray | None, seed: int = 0, *,
                      gallery=None, source=None) -> dict:
    """Within-family vs random-group retrieval, and pairwise accuracy per edit type, from the
    whole matrix `sims`, or (sims None) from the entries they read, scored by `gallery`."""
    from pipeline.data.scene_graphs import family_ids, load_graphs, sibling_pairs
    from pipeline.evaluation import two_stage
    from pipeline.evaluation.groups import group_entries, group_metrics, pairwise_accuracy, random_groups

    n_img = len(sims) if sims is not None else gallery.n_img
    graphs = load_graphs(data_dir, split, n_images=n_img)
    fam = family_ids(graphs)
    size = int(np.bincount(fam).max())
    groups = random_groups(len(fam), size, seed=seed)
    pairs = sibling_pairs(graphs)
    if sims is None:
        ii, jj = group_entries(n_img, (fam, groups), pairs)
        sims = np.full((n_img, gallery.n_cap), np.nan, dtype=np.float32)
        sims[ii, jj] = two_stage.pair_scores(gallery, ii, jj, source=source)
    within = group_metrics(sims, fam)
    rand = group_metrics(sims, groups)
    keep = ("i2t_r1", "t2i_r1", "rsum")
    return {"group_size": size,
            "family": {k: within[k] for k in keep},
            "random": {k: rand[k] for k in keep},
            "pairwise": pairwise_accuracy(sims, pairs)}
