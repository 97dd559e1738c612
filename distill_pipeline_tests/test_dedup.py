"""Near-duplicate engine: exact Jaccard, clusters, huge buckets, input handling."""

import random

import numpy as np
import pyarrow as pa
import pytest

from distill_pipeline.demo.data import generate_rows
from distill_pipeline.stages import dedup
from distill_pipeline.stages.curated_examples import normalize
from distill_pipeline.stages.dedup import (
    exact_jaccard_pairs,
    find_near_duplicates,
    jaccard,
    near_duplicate_clusters,
    shingles,
)

BASE = ("on march 3, 2026, apex holdings inc. completed the acquisition of birch energy corp. "
        "for approximately $250 million in cash.")
OTHER = "the board of cobalt software ltd. appointed maria okafor as chief financial officer, effective june 1, 2025."


def norm(texts):
    return normalize(pa.array(texts, pa.string())).to_pylist()


def brute_force_roots(texts, threshold=0.8, k=3):
    """Connected components of all pairs with exact Jaccard >= threshold (smallest index as root)."""
    sets = [shingles(t, k) for t in texts]
    root = list(range(len(texts)))

    def find(x):
        while root[x] != x:
            x = root[x]
        return x

    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            inter = len(sets[i] & sets[j])
            if inter >= threshold * (len(sets[i]) + len(sets[j]) - inter):
                a, b = find(i), find(j)
                root[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(texts))]


def test_jaccard_matches_a_hand_computation():
    # {abc, bcd} vs {abc, bce}: one shared of three
    assert jaccard("abcd", "abce") == pytest.approx(1 / 3)
    assert shingles("abcab") == {"abc", "bca", "cab"}
    assert jaccard("abcab", "abc") == pytest.approx(1 / 3)
    # a text shorter than n is one shingle: itself
    assert shingles("ab") == {"ab"} and jaccard("ab", "ab") == 1.0 and jaccard("ab", "abc") == 0.0
    assert jaccard("", "") == 1.0 and jaccard("", "a") == 0.0
    assert jaccard("abcd", "abce", shingle_size=1) == pytest.approx(3 / 5)


def test_vectorized_exact_jaccard_equals_python_on_every_packing_path():
    rng = random.Random(3)
    alphabet = "abcdefghij .,0123456789éü€日本"
    texts = ["", "a", "ab", "abc", "日本", "€"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(60)]
    texts += [t[:-1] + "x" for t in texts[10:30] if t]  # near copies
    wide = [bytes(range(33, 127)).decode() * 2, bytes(range(40, 120)).decode()]  # 94 distinct chars
    pairs = np.array([(i, j) for i in range(len(texts)) for j in range(i, len(texts))])
    # k=3: table path; k=4 with >32 chars: sorted vocabulary; k=16: Python sets (does not pack in 64 bits)
    for k, corpus in ((1, texts), (3, texts), (5, texts), (4, texts + wide), (16, texts + wide)):
        idx = pairs if corpus is texts else np.array([(i, j) for i in range(len(corpus)) for j in range(i, len(corpus))])
        got = exact_jaccard_pairs(corpus, idx, k, batch_pairs=97, workers=2)
        want = [jaccard(corpus[i], corpus[j], k) for i, j in idx]
        np.testing.assert_array_equal(got, np.array(want), err_msg=f"shingle_size={k}")


def test_planted_near_duplicates_cluster_and_different_texts_do_not():
    variants = [
        BASE,
        BASE.replace(" ", "  ", 3).rstrip(".") + " .",  # whitespace (collapsed by normalization) + punctuation
        BASE.replace(",", "", 1).replace(".", ";", 1),  # punctuation
        BASE.replace("250", "260"),  # a number edit
    ]
    texts = norm(variants + [OTHER, OTHER.replace("2025", "2026"), "this sentence has nothing to do with them."])
    assert jaccard(texts[0], texts[3]) >= 0.8 and jaccard(texts[0], texts[4]) < 0.2
    roots = near_duplicate_clusters(pa.array(texts, pa.string()))
    assert roots.dtype == np.int64
    assert roots.tolist() == [0, 0, 0, 0, 4, 4, 6]  # smallest index of each cluster; singletons map to themselves


def _edit(text: str, positions: list[int]) -> str:
    chars = list(text)
    for p in positions:
        chars[p] = "#"
    return "".join(chars)


def test_pair_just_below_the_threshold_is_not_merged_and_just_above_is():
    # replace characters spread over the text one by one until the exact Jaccard drops below 0.8
    positions = list(range(5, len(BASE) - 5, 9))
    above = below = None
    for m in range(1, len(positions)):
        j = jaccard(BASE, _edit(BASE, positions[:m]))
        if j >= 0.8:
            above = (_edit(BASE, positions[:m]), j)
        else:
            below = (_edit(BASE, positions[:m]), j)
            break
    assert 0.8 <= above[1] < 0.85 and 0.75 < below[1] < 0.8
    for sigmas in (2.0, None):  # with and without the signature prefilter: the exact check decides
        roots = near_duplicate_clusters([BASE, below[0]], prefilter_sigmas=sigmas)
        assert roots.tolist() == [0, 1]
        roots = near_duplicate_clusters([BASE, above[0]], prefilter_sigmas=sigmas)
        assert roots.tolist() == [0, 0]
    found = find_near_duplicates([BASE, above[0]])
    assert found.pairs.tolist() == [[0, 1]] and found.similarity[0] == pytest.approx(above[1])


def test_chains_join_clusters_transitively():
    """Documented behaviour: a~b and b~c put a and c in one cluster even when J(a, c) < threshold."""
    positions = list(range(3, len(BASE) - 3, 9))
    a = BASE
    b = _edit(BASE, positions[0:6:2])
    c = _edit(b, positions[1:7:2])
    assert jaccard(a, b) >= 0.8 and jaccard(b, c) >= 0.8 and jaccard(a, c) < 0.8
    assert near_duplicate_clusters([c, OTHER, a, b], prefilter_sigmas=None).tolist() == [0, 1, 0, 0]
    # keeper linkage: every member must pass against its keeper (the smallest index); c does not
    # pass against a, so c keeps itself; the chain cluster stays the unit for splits
    assert near_duplicate_clusters([a, b, c, OTHER], linkage="keeper").tolist() == [0, 0, 2, 3]
    found = find_near_duplicates([a, b, c, OTHER], keepers=True)
    assert found.roots.tolist() == [0, 0, 0, 3] and found.keepers.tolist() == [0, 0, 2, 3]
    with pytest.raises(ValueError, match="linkage"):
        near_duplicate_clusters([a, b], linkage="average")


def test_huge_bucket_of_templated_sentences_stays_linear_and_keeps_recall():
    """Thousands of sentences of one template share LSH buckets; pairs inside are not all verified."""
    rng = random.Random(11)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    template = ("we may be adversely affected by changes in {} {} regulation, which could harm our "
                "business, our {} operations and the results of our {} segment.")
    slots = list(dict.fromkeys(tuple(rng.choice(words) for _ in range(4)) for _ in range(2100)))[:2000]
    texts = [template.format(*s) for s in slots]
    n = len(texts)
    p = dedup.Params()
    keys, _ = dedup._signatures(pa.array(texts, pa.string()), p)
    biggest = max(np.unique(keys[:, b], return_counts=True)[1].max() for b in range(p.bands))
    assert biggest > 10 * p.max_bucket_pairs  # the huge-bucket path is exercised

    found = find_near_duplicates(texts, keepers=True)
    assert found.verified < 60 * n  # all pairs would be n(n-1)/2 = 1,999,000
    # keepers: at or before each text, in its chain cluster, and a verified near duplicate of it
    keepers, idx = found.keepers, np.arange(n)
    assert (keepers <= idx).all() and (keepers[keepers] == keepers).all()
    assert (found.roots[keepers] == found.roots).all()
    members = idx[keepers != idx]
    assert len(members) > 100
    assert (exact_jaccard_pairs(texts, np.stack((keepers[members], members), axis=1)) >= 0.8).all()
    assert all(jaccard(texts[i], texts[j]) >= 0.8 for i, j in found.pairs)  # only verified merges
    # recall on the pairs that differ in one slot word and are near duplicates
    by_rest = {}
    for i, s in enumerate(slots):
        for k in range(4):
            by_rest.setdefault((k, s[:k] + s[k + 1:]), []).append(i)
    pairs = np.array([(g[0], j) for g in by_rest.values() for j in g[1:]])
    close = pairs[exact_jaccard_pairs(texts, pairs) >= 0.8]
    assert len(close) > 500
    assert np.mean(found.roots[close[:, 0]] == found.roots[close[:, 1]]) >= 0.97


def test_matches_brute_force_components_on_a_small_mixed_corpus():
    rows = [r.sentence for r in generate_rows(700, seed=5) if r.sentence and r.sentence.strip()]
    texts = list(dict.fromkeys(norm(rows)))
    want = brute_force_roots(texts)
    got = near_duplicate_clusters(texts, prefilter_sigmas=None).tolist()
    # LSH may miss a pair; on this fixed data it misses none (deterministic hashing)
    assert got == want
    assert near_duplicate_clusters(texts).tolist() == want


def test_recall_on_demo_planted_near_duplicates():
    rows = list(generate_rows(6000, seed=9))
    planted = [(r.sentence, r.source_sentence) for r in rows
               if r.source_sentence is not None and r.sentence != r.source_sentence]
    assert len(planted) > 200
    texts = list(dict.fromkeys(t for t in norm([r.sentence or "" for r in rows]) if t))
    index = {t: i for i, t in enumerate(texts)}
    pairs = [(index[a], index[b]) for a, b in zip(norm([p[0] for p in planted]), norm([p[1] for p in planted]))
             if jaccard(a, b) >= 0.8]
    roots = near_duplicate_clusters(pa.array(texts, pa.large_string()))
    recall = np.mean([roots[i] == roots[j] for i, j in pairs])
    assert recall >= 0.97


def test_inputs_chunking_and_workers_do_not_change_the_result():
    rows = [r.sentence for r in generate_rows(1500, seed=2) if r.sentence and r.sentence.strip()]
    texts = list(dict.fromkeys(norm(rows)))
    ref = near_duplicate_clusters(texts)
    assert len(np.unique(ref)) < len(texts)  # there are clusters to get right
    arr = pa.array(["padding"] * 3 + texts, pa.string()).slice(3)  # a sliced array (non-zero offset)
    chunked = pa.chunked_array([pa.array(texts[:100], pa.string()), pa.array(texts[100:], pa.string())])
    for variant in (near_duplicate_clusters(arr), near_duplicate_clusters(chunked),
                    near_duplicate_clusters(texts, workers=1, chunk_docs=37, verify_batch=50, max_pending=500)):
        np.testing.assert_array_equal(variant, ref)


def test_bad_input_fails_clearly():
    assert near_duplicate_clusters([]).tolist() == []
    assert near_duplicate_clusters(["only one"]).tolist() == [0]
    with pytest.raises(ValueError, match=r"texts\[1\] is null"):
        near_duplicate_clusters(pa.array(["a", None], pa.string()))
    with pytest.raises(TypeError, match="strings"):
        near_duplicate_clusters(pa.array([1, 2]))
    with pytest.raises(ValueError, match="bands=10 must divide num_perm=128"):
        near_duplicate_clusters(["a", "b"], bands=10)
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_clusters(["a", "b"], threshold=1.5)
