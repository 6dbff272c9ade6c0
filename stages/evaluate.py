"""DVC stage `evaluate_*`: score a checkpoint on a split under a protocol.

On the embedded dataset (a `{split}_graphs.jsonl` beside the features) it also measures
retrieval among the image's own family only (the hard negatives the generator planted)
against random groups of the same size, and pairwise accuracy per edit type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.checkpoint import load_checkpoint
from pipeline.data.precomp import open_split
from pipeline.io import refuse_overlap, write_json
from pipeline.scoring import encode_gallery

SECTION = "evaluate_base"


def run(*, checkpoint, data_dir, split: str = "test", protocol: str = "full",
        out_json=None, groups_json=None, device: str = "cpu", batch_size: int = 128,
        progress: bool = True) -> dict:
    from pipeline.options import check_values
    from stages.params_schema import evaluate_section

    check_values({"split": split, "protocol": protocol, "batch_size": batch_size}, evaluate_section(),
                 "evaluate")
    for out in (out_json, groups_json):     # a metrics file never lands on an input
        if out:
            refuse_overlap(out, [checkpoint, data_dir])
    model, cfg = load_checkpoint(checkpoint, device, data_dir=data_dir)
    data = open_split(data_dir, split, expected_dim=cfg["model"].get("img_dim"))
    gallery = encode_gallery(model, data, batch_size=batch_size, device=device,
                             progress=progress, source=checkpoint)  # refuses NaN / zero rows
    metrics = gallery.evaluate(protocol)
    if out_json:
        write_json(out_json, metrics)
    result = {"metrics": metrics}
    graphs_file = Path(data_dir) / f"{split}_graphs.jsonl"
    if graphs_file.exists():
        result["groups"] = family_evaluation(data_dir, split, gallery.matrix())
        if groups_json:
            write_json(groups_json, result["groups"])
    return result


def family_evaluation(data_dir, split, sims: np.ndarray, seed: int = 0) -> dict:
    """Within-family vs random-group retrieval, and pairwise accuracy per edit type."""
    from pipeline.data.scene_graphs import family_ids, load_graphs, sibling_pairs
    from pipeline.evaluation.groups import group_metrics, pairwise_accuracy, random_groups

    graphs = load_graphs(data_dir, split, n_images=len(sims))
    fam = family_ids(graphs)
    size = int(np.bincount(fam).max())
    within = group_metrics(sims, fam)
    rand = group_metrics(sims, random_groups(len(fam), size, seed=seed))
    pairs = sibling_pairs(graphs)
    keep = ("i2t_r1", "t2i_r1", "rsum")
    return {"group_size": size,
            "family": {k: within[k] for k in keep},
            "random": {k: rand[k] for k in keep},
            "pairwise": pairwise_accuracy(sims, pairs)}
