"""Curation throughput and near-duplicate recall on demo rows, with datasketch side by side.

    .venv/bin/python bench/dedup.py [--rows 200000] [--seed 7] [--datasketch-docs 20000]

Generated rows (distill_pipeline.demo.data, not timed) are curated end to end by
`curate_table` (decoding, validation, filters, exact then near duplicates): docs_per_s
= rows / seconds; end_to_end_dedup_seconds is the near-duplicate engine's share of them. Our near-duplicate engine is also timed alone on the distinct
normalized inputs, and datasketch (MinHash + MinHashLSH, the same 3-char shingles,
128 permutations, 16 bands x 8 rows, candidates verified exactly and united) on the
first --datasketch-docs of those texts (it is ~100x slower; its rate does not depend
much on the count).

Recall: the demo's planted near duplicates are rows edited from an earlier sentence
(`source_sentence`); a planted pair counts when the exact Jaccard of the normalized
texts is >= 0.8, and is recalled when both texts end in one cluster. End to end, a
row's cluster is its `cluster_key` (the near-duplicate chain it belongs to, kept
or dropped as a duplicate: the unit that splits never divide); pairs with a row
quarantined for another reason (invalid output, low confidence, ...) have no
cluster and are left out (counted).

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from distill_pipeline.config import load_config  # noqa: E402
from distill_pipeline.demo.data import generate_rows, source_table  # noqa: E402
from distill_pipeline.stages import dedup  # noqa: E402
from distill_pipeline.stages.curated_examples import curate_table, normalize  # noqa: E402



def demo_table(n: int, seed: int) -> tuple[pa.Table, list[tuple[int, str]]]:
    """source_rows-shaped table of n demo rows, and (row, source sentence) of each planted near duplicate."""
    rows = list(generate_rows(n, seed))
    planted = [(i, row.source_sentence) for i, row in enumerate(rows)
               if row.source_sentence is not None and row.sentence != row.source_sentence]
    return source_table(rows, first_id=0), planted


def norm(texts: list[str]) -> list[str]:
    return normalize(pa.array(texts, pa.string())).to_pylist()


def ground_truth(table: pa.Table, planted: list[tuple[int, str]], threshold: float, k: int):
    """Planted pairs (normalized near-dup text, normalized source text) with exact Jaccard >= threshold."""
    inputs = table.column("input").to_pylist()
    a = norm([inputs[i] for i, _ in planted])
    b = norm([src for _, src in planted])
    pairs = [(i, x, y) for (i, _), x, y in zip(planted, a, b) if x and y and dedup.jaccard(x, y, k) >= threshold]
    return pairs, len(planted)


def engine_alone(table: pa.Table, truth, cfg) -> dict:
    texts = pc.unique(normalize(table.column("input").drop_null()))
    texts = texts.filter(pc.greater(pc.utf8_length(texts), 0))
    c = cfg.curate
    started = time.perf_counter()
    found = dedup.find_near_duplicates(texts, threshold=c.near_duplicate_threshold, shingle_size=c.shingle_size,
                                       num_perm=c.num_perm, bands=c.lsh_bands, workers=c.workers)
    seconds = time.perf_counter() - started
    index = {t: i for i, t in enumerate(texts.to_pylist())}
    hits = sum(found.roots[index[x]] == found.roots[index[y]] for _, x, y in truth)
    sizes = np.bincount(found.roots)
    return {"docs": len(texts), "seconds": seconds, "docs_per_s": len(texts) / seconds,
            "recall": hits / max(len(truth), 1), "pairs_verified": found.verified,
            "clusters": int((sizes > 0).sum()), "largest_cluster": int(sizes.max()), "texts": texts}


def end_to_end(table: pa.Table, truth, cfg) -> dict:
    # the near-duplicate engine's share of the run (curation calls it once, with keepers)
    engine = {"seconds": 0.0}
    find = dedup.find_near_duplicates

    def find_timed(*args, **kwargs):
        began = time.perf_counter()
        try:
            return find(*args, **kwargs)
        finally:
            engine["seconds"] += time.perf_counter() - began

    dedup.find_near_duplicates = find_timed
    try:
        started = time.perf_counter()
        result = curate_table(table, cfg)
        seconds = time.perf_counter() - started
    finally:
        dedup.find_near_duplicates = find
    cluster = dict(zip(result.examples.column("id").to_pylist(), result.examples.column("cluster_key").to_pylist()))
    q = result.quarantine
    for rid, reason, key in zip(q.column("id").to_pylist(), q.column("reason").to_pylist(),
                                q.column("cluster_key").to_pylist()):
        if reason in ("exact_duplicate", "near_duplicate"):
            if key is None:
                raise SystemExit(f"row {rid}: a duplicate without its cluster key")
            cluster[rid] = key
    # a source text may be on several rows (exact duplicates): any clustered one stands for it
    inputs = norm([t or "" for t in table.column("input").to_pylist()])
    ids = [str(v) for v in table.column("id").to_pylist()]
    rows_of = defaultdict(list)
    for rid, text in zip(ids, inputs):
        if rid in cluster:
            rows_of[text].append(rid)
    hits = eligible = 0
    for i, x, y in truth:
        rid = ids[i]
        if rid not in cluster or not rows_of.get(y):
            continue
        eligible += 1
        hits += any(cluster[rid] == cluster[s] for s in rows_of[y])
    return {"rows": table.num_rows, "seconds": seconds, "docs_per_s": table.num_rows / seconds,
            "dedup_seconds": engine["seconds"], "recall": hits / max(eligible, 1), "eligible_pairs": eligible,
            "kept": result.counts.get("kept"), "counts": result.counts}


def datasketch_run(texts: list[str], truth, k: int, threshold: float, num_perm: int, bands: int) -> dict:
    """datasketch on the same texts: MinHash of the same shingles, MinHashLSH (same banding), then
    the candidates verified exactly and united, as our engine does. Its docs/s counts only the
    MinHash + index + query part (the verification is our Python here, timed apart)."""
    from datasketch import MinHash, MinHashLSH

    started = time.perf_counter()
    shingle_sets = ([s.encode() for s in dedup.shingles(t, k)] for t in texts)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=(bands, num_perm // bands))
    sketches = []
    for i, m in enumerate(MinHash.generator(shingle_sets, num_perm=num_perm)):
        lsh.insert(i, m)
        sketches.append(m)
    candidates = [[j for j in lsh.query(m) if j > i] for i, m in enumerate(sketches)]
    seconds = time.perf_counter() - started
    parent = list(range(len(texts)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    started = time.perf_counter()
    for i, js in enumerate(candidates):
        for j in js:
            if find(i) != find(j) and dedup.jaccard(texts[i], texts[j], k) >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    verify_seconds = time.perf_counter() - started
    index = {t: i for i, t in enumerate(texts)}
    inside = [(x, y) for _, x, y in truth if x in index and y in index]
    hits = sum(find(index[x]) == find(index[y]) for x, y in inside)
    return {"docs": len(texts), "seconds": seconds, "docs_per_s": len(texts) / seconds,
            "verify_seconds": verify_seconds, "recall": hits / max(len(inside), 1), "pairs": len(inside),
            "clusters": len({find(i) for i in range(len(texts))}),
            "candidates": sum(len(js) for js in candidates)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--datasketch-docs", type=int, default=20_000, help="0 skips datasketch")
    ap.add_argument("--skip-end-to-end", action="store_true")
    args = ap.parse_args()

    cfg = load_config(env={"DISTILL_HOME": os.environ.get("DISTILL_HOME", str(REPO / ".distill"))})
    c = cfg.curate
    t0 = time.perf_counter()
    table, planted = demo_table(args.rows, args.seed)
    truth, n_planted = ground_truth(table, planted, c.near_duplicate_threshold, c.shingle_size)
    print(f"generated {table.num_rows} rows in {time.perf_counter() - t0:.1f}s; planted near duplicates "
          f"{n_planted}, of which {len(truth)} with Jaccard >= {c.near_duplicate_threshold} "
          f"(shingles of {c.shingle_size} chars, after normalization)", file=sys.stderr)

    ours = engine_alone(table, truth, cfg)
    print(f"engine alone : {ours['docs']} distinct texts in {ours['seconds']:.2f}s = {ours['docs_per_s']:,.0f} docs/s, "
          f"recall {ours['recall']:.4f}, {ours['pairs_verified']} pairs verified exactly, "
          f"{ours['clusters']} clusters (largest {ours['largest_cluster']})", file=sys.stderr)

    e2e = None
    if not args.skip_end_to_end:
        e2e = end_to_end(table, truth, cfg)
        print(f"end to end   : {e2e['rows']} rows curated in {e2e['seconds']:.2f}s = {e2e['docs_per_s']:,.0f} rows/s "
              f"(near duplicates with keepers {e2e['dedup_seconds']:.2f}s, the rest of curation "
              f"{e2e['seconds'] - e2e['dedup_seconds']:.2f}s), recall {e2e['recall']:.4f} on {e2e['eligible_pairs']} "
              f"pairs whose rows were not quarantined for other reasons; counts {e2e['counts']}", file=sys.stderr)

    ds = None
    if args.datasketch_docs:
        texts = ours["texts"].to_pylist()[: args.datasketch_docs]
        ds = datasketch_run(texts, truth, c.shingle_size, c.near_duplicate_threshold, c.num_perm, c.lsh_bands)
        ours_same = dedup.find_near_duplicates(texts, threshold=c.near_duplicate_threshold,
                                               shingle_size=c.shingle_size, num_perm=c.num_perm,
                                               bands=c.lsh_bands, workers=c.workers)
        print(f"datasketch   : {ds['docs']} texts: MinHash + LSH insert + query in {ds['seconds']:.2f}s = "
              f"{ds['docs_per_s']:,.0f} docs/s ({ds['candidates']} candidate pairs, then {ds['verify_seconds']:.2f}s "
              f"to verify them exactly); recall {ds['recall']:.4f} on the {ds['pairs']} planted pairs inside them, "
              f"{ds['clusters']} clusters; our engine on the same texts: {len(np.unique(ours_same.roots))} clusters",
              file=sys.stderr)

    headline = e2e if e2e else ours
    out = {
        "docs_per_s": round(headline["docs_per_s"]),
        "recall": round(headline["recall"], 4),
        "docs": e2e["rows"] if e2e else ours["docs"],
        "seconds": round(headline["seconds"], 2),
        "measured": "end_to_end" if e2e else "engine_alone",
        **({"end_to_end_dedup_seconds": round(e2e["dedup_seconds"], 2)} if e2e else {}),
        "engine_docs_per_s": round(ours["docs_per_s"]),
        "engine_recall": round(ours["recall"], 4),
        "engine_docs": ours["docs"],
        "engine_seconds": round(ours["seconds"], 2),
        "planted_pairs": len(truth),
        "cpus": os.cpu_count(),
        "workers": c.workers,
    }
    if ds:
        out.update({"datasketch_docs_per_s": round(ds["docs_per_s"]), "datasketch_recall": round(ds["recall"], 4),
                    "datasketch_docs": ds["docs"],
                    "ratio_vs_datasketch": round(ours["docs_per_s"] / ds["docs_per_s"], 1),
                    "ratio_end_to_end_vs_datasketch": round(headline["docs_per_s"] / ds["docs_per_s"], 1)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
