"""DVC stage `mine`: offline hard-negative candidate files from a split's embeddings.

Inputs, one of:
  * ``img_embs`` + ``cap_embs``: two .npy files, (N_img, D) and (5 N_img, D), memory-mapped;
  * ``embeddings_dir``: the folder written by the `embed` stage (img_embs.npy, cap_embs.npy,
    embeddings.json);
  * ``checkpoint`` + ``data_dir``: embed ``split`` first (into ``embeddings_dir``, default
    ``out_dir/embeddings``), then mine.
Output (``pipeline.mining.candidates.write_candidates``): AOQ's ``i2t_<name>.npy`` /
``t2i_<name>.npy`` int32, the Parquet table and ``candidates_<name>.json``; optionally a
small summary JSON for ``dvc metrics``.

The flow is resolve inputs -> validate -> k-NN (:func:`_knn`, in process or sharded over a
dask cluster) -> false-negative filters (:func:`_filter`, off by default) -> write.
"""
from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import atomic_dir, jsonable, refuse_overlap
from pipeline.mining.embed import CAP_FILE, IMG_FILE, META_FILE
from pipeline.mining.mine import MineConfig, mine_embeddings, open_embedding_pair
from pipeline.mining.reference import capped_k

SECTION = "mine"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- inputs
def _read_embeddings_meta(folder: Path) -> dict | None:
    path = folder / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"unreadable embeddings metadata ({e.__class__.__name__})") from None
    if not isinstance(meta, dict):
        raise InputError(path, "not an embeddings metadata object")
    return meta


def resolve_inputs(*, img_embs=None, cap_embs=None, embeddings_dir=None, checkpoint=None,
                   data_dir=None, split: str = "train", out_dir=None, embed_options=None,
                   scheduler=None, workers=None, progress: bool = True
                   ) -> tuple[Path, Path, dict | None]:
    """(image file, caption file, embeddings.json dict or None); embeds first when given a
    checkpoint."""
    if checkpoint is not None:
        if img_embs is not None or cap_embs is not None:
            raise InputError(None, "give either --checkpoint (with --data) or --img-embs/--cap-embs, not both")
        if data_dir is None:
            raise InputError(None, "--checkpoint needs --data (the precomp folder to embed)")
        from stages.embed import run as embed_run

        folder = Path(embeddings_dir) if embeddings_dir is not None else Path(out_dir) / "embeddings"
        meta = embed_run(checkpoint=checkpoint, data_dir=data_dir, out_dir=folder, split=split,
                         scheduler=scheduler, workers=workers, progress=progress,
                         **(embed_options or {}))
        return folder / IMG_FILE, folder / CAP_FILE, meta
    if img_embs is not None or cap_embs is not None:
        if img_embs is None or cap_embs is None:
            raise InputError(None, "--img-embs and --cap-embs go together")
        if embeddings_dir is not None:
            raise InputError(None, "give either --embeddings-dir or --img-embs/--cap-embs, not both")
        img_embs, cap_embs = Path(img_embs), Path(cap_embs)
        meta = None
        if img_embs.name == IMG_FILE and cap_embs.name == CAP_FILE and img_embs.parent == cap_embs.parent:
            meta = _read_embeddings_meta(img_embs.parent)   # written by `embed`: provenance
        return img_embs, cap_embs, meta
    if embeddings_dir is not None:
        folder = Path(embeddings_dir)
        if not folder.is_dir():
            raise InputError(folder, "embeddings folder not found")
        return folder / IMG_FILE, folder / CAP_FILE, _read_embeddings_meta(folder)
    raise InputError(None, "no embeddings: give --img-embs and --cap-embs, --embeddings-dir, "
                           "or --checkpoint with --data")


def resolve_name(name, data_dir, emb_meta) -> str:
    from pipeline.mining.candidates import dataset_name

    if name is None:
        if data_dir is not None:
            name = dataset_name(data_dir)
        elif emb_meta and emb_meta.get("data"):
            name = dataset_name(emb_meta["data"])
        else:
            raise InputError(None, "--name is required when the embeddings come without --data "
                                   "(it names the files: i2t_<name>.npy, t2i_<name>.npy)")
    name = str(name)
    if not _NAME.match(name):
        raise InputError(None, f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


# --------------------------------------------------------------------------- k-NN, filters
def _knn(img, cap, cfg: MineConfig, progress: bool, *, img_path=None, cap_path=None,
         scheduler=None, workers=None, scratch=None):
    """k-NN of both directions, in this process or sharded over a dask cluster."""
    if scheduler or workers:
        if cfg.backend != "torch":
            raise InputError(None, "--scheduler/--workers shard the torch backend: use --backend torch")
        from pipeline.mining.distributed import get_client, mine_distributed

        with get_client(scheduler, workers) as client:
            # paths, not arrays: every worker memory-maps the same files
            return mine_distributed(str(img_path), str(cap_path), cfg.k_i2t, cfg.k_t2i, client,
                                    precision=cfg.precision, device=cfg.device,
                                    row_block=int(cfg.row_block), col_block=int(cfg.col_block),
                                    progress=progress)
    return mine_embeddings(img, cap, cfg, progress=progress, scratch=scratch)


def _filter(knn, img, cap, fcfg, k_i2t: int, k_t2i: int, *, data_dir, split,
            positives=None) -> tuple:
    """Apply the false-negative filters; metadata says what each removed and, on the
    embedded dataset, how many of those were true false negatives. `positives`: the
    (pos_i2t, pos_t2i) of the scores the candidates carry (default: the embeddings')."""
    from pipeline.mining.filters import apply_filters, count_false_negatives, positive_scores

    captions = None
    if fcfg.text_filter:
        if data_dir is None:
            raise InputError(None, "--text-filter needs the captions: give --data (and --split)")
        from pipeline.data.precomp import open_split

        captions = open_split(data_dir, split, check_finite="none").captions
        if captions is None:
            raise InputError(data_dir, f"--text-filter needs {split}_caps.txt (raw captions)")
    pos_i2t, pos_t2i = positives if positives is not None else positive_scores(img, cap)
    knn, report = apply_filters(knn, k_i2t, k_t2i, fcfg, pos_i2t=pos_i2t, pos_t2i=pos_t2i,
                                captions=captions)
    meta = {"config": fcfg.to_dict(),
            "removed": {f: report[f] for f in fcfg.active_filters()}}
    if data_dir is not None and (Path(data_dir) / f"{split}_graphs.jsonl").exists():
        from pipeline.data.scene_graphs import load_graphs

        meta["true_false_negatives_removed"] = count_false_negatives(report, load_graphs(data_dir, split))
    return knn, jsonable(meta)


# --------------------------------------------------------------------------- run
def run(*, out_dir, cfg: MineConfig | None = None, name: str | None = None, img_embs=None,
        cap_embs=None, embeddings_dir=None, checkpoint=None, data_dir=None,
        split: str = "train", embed_options: dict | None = None, summary_json=None,
        filters: dict | None = None, scheduler: str | None = None, workers: int | None = None,
        rescore=None, rescore_k: int | None = None, progress: bool = True) -> dict:
    """Mine and write the candidate files. Returns a summary (also in ``summary_json``,
    less its ``timings``: the files written are the same bytes for the same inputs, and the
    `mine-candidates` command puts the timings beside the folder, pipeline.timings)."""
    from pipeline.io import write_json
    from pipeline.mining.filters import FilterConfig

    cfg = (cfg or MineConfig()).validate()
    fcfg = FilterConfig.from_dict(filters or {})
    out_dir = Path(out_dir)
    if name is not None or data_dir is not None:    # fail before embedding, not after
        name = resolve_name(name, data_dir, None)
    inputs = [img_embs, cap_embs, checkpoint, data_dir, rescore] + \
        ([embeddings_dir] if checkpoint is None else [])
    if rescore is None and rescore_k is not None:
        raise InputError("--rescore-k", "applies only with --rescore CHECKPOINT")
    if summary_json:
        refuse_overlap(summary_json, [*inputs, out_dir])
    # the folder is built beside out_dir and renamed into place whole (an earlier output of
    # this command is replaced; anything else is refused before any work)
    with atomic_dir(out_dir, "mine-candidates", inputs=inputs) as tmp:
        def shown(p: Path) -> Path:   # where a file inside the build folder will end up
            return out_dir / p.relative_to(tmp) if tmp in p.parents else p

        img_path, cap_path, emb_meta = resolve_inputs(
            img_embs=img_embs, cap_embs=cap_embs, embeddings_dir=embeddings_dir,
            checkpoint=checkpoint, data_dir=data_dir, split=split, out_dir=tmp,
            embed_options=embed_options, scheduler=scheduler, workers=workers, progress=progress)
        if name is None:
            name = resolve_name(None, None, emb_meta)
        img, cap = open_embedding_pair(img_path, cap_path)
        n_img, dim = (int(s) for s in img.shape)
        if emb_meta is not None and (emb_meta.get("n_img"), emb_meta.get("dim")) not in ((n_img, dim), (None, None)):
            raise InputError(shown(img_path.parent / META_FILE),
                             f"describes {emb_meta.get('n_img')} x {emb_meta.get('dim')} embeddings, "
                             f"but {img_path.name} is {n_img} x {dim}")

        t0 = time.perf_counter()
        k_i2t, k_t2i = capped_k(cfg.k_i2t, cfg.k_t2i, n_img)
        # with filters on, mine with headroom so every row still holds K afterwards
        head_i2t, head_t2i = capped_k(k_i2t + fcfg.headroom(k_i2t), k_t2i + fcfg.headroom(k_t2i), n_img)
        short_i2t, short_t2i = head_i2t, head_t2i
        rescorer = None
        if rescore is not None:     # loaded (and its split checked) before the long pass
            from pipeline.mining.rescore import shortlist_sizes

            rescorer = _open_rescorer(rescore, data_dir, split, emb_meta, n_img, cfg.device,
                                      checkpoint is not None)
            short_i2t, short_t2i = capped_k(*shortlist_sizes(rescore_k, head_i2t, head_t2i), n_img)
        mine_cfg = dataclasses.replace(cfg, k_i2t=short_i2t, k_t2i=short_t2i)
        # the pass works in memory-mapped files in the build folder (removed before it is
        # renamed), so a big training set does not need its candidates in private memory.
        # A SIGKILL leaves them in the build folder, whose in-use marker (pid, host, start
        # time: pipeline.io.mark_in_use) lets the next run into out_dir remove it once this
        # process is gone, and never while it lives or when another host wrote it
        with tempfile.TemporaryDirectory(prefix=".mine-scratch-", dir=tmp) as scratch:
            knn = _knn(img, cap, mine_cfg, progress, img_path=img_path, cap_path=cap_path,
                       scheduler=scheduler, workers=workers, scratch=scratch)
            positives = None
            if rescorer is not None:
                knn, positives, rescore_meta = _rescore(knn, rescorer, head_i2t, head_t2i,
                                                        progress)
            files, summary = _finish(knn, img, cap, cfg, fcfg, t0, out_dir=tmp, name=name,
                                     img_path=shown(img_path), cap_path=shown(cap_path),
                                     emb_meta=emb_meta, data_dir=data_dir, split=split,
                                     checkpoint=checkpoint, k_i2t=k_i2t, k_t2i=k_t2i,
                                     positives=positives,
                                     rescore=rescore_meta if rescorer is not None else None)
            del knn
        del img, cap
    summary["files"] = {k: str(shown(Path(v))) for k, v in summary["files"].items()}
    if summary_json:
        write_json(summary_json, {k: v for k, v in summary.items() if k != "timings"})
    return summary


def _open_rescorer(path, data_dir, split, emb_meta, n_img, device, embedded_here: bool) -> dict:
    """The re-scorer (any model kind), the split it scores (the embeddings'), checked
    against the embeddings' size."""
    from pipeline.checkpoint import checkpoint_hash, load_checkpoint
    from pipeline.data.precomp import open_split

    src_data = data_dir or (emb_meta or {}).get("data")
    if src_data is None:
        raise InputError("--rescore", "needs the split it re-scores: give --data (the "
                                      "embeddings' metadata names no data folder)")
    src_split = (emb_meta or {}).get("split") or (split if embedded_here or data_dir else None)
    if src_split is None:
        raise InputError("--rescore", "the embeddings name no split: give --checkpoint with "
                                      "--split, or embeddings written by `embed`")
    model, cfg = load_checkpoint(path, device, data_dir=src_data)
    data = open_split(src_data, src_split, expected_dim=cfg["model"].get("img_dim"))
    if data.n_images != n_img:
        raise InputError(path, f"re-scores split {src_split!r} of {src_data} ({data.n_images} "
                               f"images), but the embeddings hold {n_img} images")
    return {"model": model, "split": data, "path": path, "device": device,
            "meta": {"checkpoint": str(path), "checkpoint_hash": checkpoint_hash(path),
                     "model": getattr(model, "name", None), "kind": getattr(model, "kind", None),
                     "data": str(src_data), "split": src_split}}


def _rescore(knn, rescorer: dict, k_i2t: int, k_t2i: int, progress: bool):
    """(knn re-scored and cut to k, the re-scorer's positive scores, metadata)."""
    from pipeline.mining.rescore import positive_scores, rescore_knn
    from pipeline.scoring import encode_gallery

    t = time.perf_counter()
    gallery = encode_gallery(rescorer["model"], rescorer["split"], device=rescorer["device"],
                             progress=progress, source=rescorer["path"])
    shortlist = {"i2t": int(knn.i2t.shape[1]), "t2i": int(knn.t2i.shape[1])}
    knn = rescore_knn(knn, gallery, k_i2t, k_t2i, source=rescorer["path"], progress=progress)
    knn.stats["seconds_rescore"] = time.perf_counter() - t
    return knn, positive_scores(gallery), {**rescorer["meta"], "shortlist": shortlist}


def _finish(knn, img, cap, cfg, fcfg, t0, *, out_dir, name, img_path, cap_path, emb_meta,
            data_dir, split, checkpoint, k_i2t, k_t2i, positives=None, rescore=None):
    """Filters (when on), metadata, and the candidate files."""
    from pipeline.mining.candidates import Candidates, write_candidates

    n_img, dim = (int(s) for s in img.shape)
    n_cap = int(cap.shape[0])
    filters_meta = {}
    if fcfg.active():
        src_data = data_dir or (emb_meta or {}).get("data")
        src_split = (emb_meta or {}).get("split") or split
        knn, filters_meta = _filter(knn, img, cap, fcfg, k_i2t, k_t2i, data_dir=src_data,
                                    split=src_split, positives=positives)
    seconds = time.perf_counter() - t0
    k1, k2 = int(knn.i2t.shape[1]), int(knn.t2i.shape[1])
    flop = 2.0 * n_img * n_cap * dim
    stats = jsonable(knn.stats)
    meta = {
        "checkpoint_hash": (emb_meta or {}).get("checkpoint_hash"),
        "source": {
            "img_embs": str(img_path), "cap_embs": str(cap_path),
            "checkpoint": (emb_meta or {}).get("checkpoint"),
            "model": (emb_meta or {}).get("model"),
            "data": (emb_meta or {}).get("data", str(data_dir) if data_dir else None),
            "split": (emb_meta or {}).get("split", split if checkpoint else None),
        },
        "n_img": n_img, "n_cap": n_cap, "dim": dim,
        "k_requested": {"i2t": int(cfg.k_i2t), "t2i": int(cfg.k_t2i)},
        "k": {"i2t": k1, "t2i": k2},
        "backend": cfg.backend,
        # the precision asked for: `auto` picks by timing, and the answer is exact in every
        # case, so the one it picked goes to the timings with the pass statistics
        "precision": cfg.precision if cfg.backend == "torch" else None,
        "index": cfg.index if cfg.backend == "faiss" else None,
        "device": cfg.device,
        "filters": filters_meta,
        # the order and scores of the files: the re-scorer's when there is one
        "rescore": rescore,
    }
    files = write_candidates(out_dir, name,
                             Candidates.from_knn(knn, meta=meta))
    summary = {
        "name": name, "n_img": n_img, "n_cap": n_cap, "dim": dim,
        "k_i2t": k1, "k_t2i": k2, "k_i2t_requested": int(cfg.k_i2t),
        "k_t2i_requested": int(cfg.k_t2i), "backend": cfg.backend,
        "precision": meta["precision"], "index": meta["index"],
        "files": {k: str(v) for k, v in files.items()},
        "rescore": rescore,
        # not in the tracked files (summary_json, the candidates' metadata): see pipeline.timings
        "timings": {"seconds": round(seconds, 3),
                    "gflops": round(flop / max(seconds, 1e-9) / 1e9, 2),
                    "precision": stats.get("precision") if cfg.backend == "torch" else None,
                    "stats": stats},
    }
    return files, summary
