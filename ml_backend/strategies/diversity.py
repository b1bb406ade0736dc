"""Diversity strategies on the U-Net bottleneck embedding: k-means and core-set; plus the greedy max-cover helper.

The embedding is ``model.embed``: the channel-wise spatial mean of the bottleneck (Roels & Saeys 2019, sections
3.4-3.5; the same descriptor Yang et al. 2017 use). The two greedy algorithms here (k-center, max-cover) are shared
with ``suggestive`` and ``hybrid``; both are vectorised over the pool, with a Python loop only over the k picks.
"""

from __future__ import annotations

import warnings

import numpy as np
from pydantic import Field
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from .base import PoolBatch, Selection, Strategy, batch_values, register_strategy
from .params import StrategyParams

# Above this many candidate x pool similarity entries (float32: 4 bytes each) max-cover recomputes rows per step.
_MAX_COVER_DENSE_LIMIT = 50_000_000


def _sq_dists(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances from every point (n, D) to one centre (D,)."""
    diff = points - centre
    return np.einsum("ij,ij->i", diff, diff)


def min_sq_dists(points: np.ndarray, centres: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(n,) squared distance from each point to its nearest centre (m, D); chunked to bound memory."""
    out = np.empty(points.shape[0], dtype=np.float64)
    c_sq = np.einsum("ij,ij->i", centres, centres)
    for start in range(0, points.shape[0], chunk):
        p = points[start : start + chunk]
        d = np.einsum("ij,ij->i", p, p)[:, None] - 2.0 * p @ centres.T + c_sq[None, :]
        out[start : start + chunk] = np.maximum(d.min(axis=1), 0.0)
    return out


def k_center_greedy(
    embeddings: np.ndarray,
    k: int,
    labelled: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy k-center (Sener & Savarese 2018, Algorithm 1): repeatedly pick the point farthest from all centres.

    Centres start as the labelled embeddings; without any, the first pick is a seeded random point. Returns
    (order (k,), final squared distance of every point to its nearest centre). A picked point is never picked again,
    and a point identical to a centre (distance 0) is picked only when no point at positive distance is left.
    Cost: O(k n D) time, O(n) extra memory.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    n = x.shape[0]
    k = min(k, n)
    order = np.empty(k, dtype=np.int64)
    if labelled is not None and labelled.shape[0] > 0:
        dist = min_sq_dists(x, np.asarray(labelled, dtype=np.float64))
        start = 0
    else:
        first = int(np.random.default_rng(seed).integers(n))
        order[0] = first
        dist = _sq_dists(x, x[first])
        start = 1
    chosen = np.zeros(n, dtype=bool)
    chosen[order[:start]] = True
    for r in range(start, k):
        masked = np.where(chosen, -np.inf, dist)
        idx = int(np.argmax(masked))  # ties: lowest index
        order[r] = idx
        chosen[idx] = True
        np.minimum(dist, _sq_dists(x, x[idx]), out=dist)
    return order, dist


def cosine_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float32, so that a @ b.T is cosine similarity."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def greedy_max_cover(similarity: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Greedy generalised max-k-cover (Yang et al. 2017, section 2.3; Feige 1998).

    ``similarity`` is (K candidates, N covered items). With S the chosen candidates,
        F(S) = sum_x max(0, max_{s in S} sim(s, x))       (F(empty) = 0; negative similarity covers nothing)
    Greedy adds the candidate with the largest gain F(S + i) - F(S); F is monotone submodular, so the result is
    within (1 - 1/e) of the optimum. Returns (order (k,), F). Ties: lowest candidate index. O(k K N) time.
    """
    sim = np.asarray(similarity, dtype=np.float32)
    if sim.ndim != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"similarity must be a non-empty (K, N) matrix, got {sim.shape}")
    k = min(k, sim.shape[0])
    cover = np.zeros(sim.shape[1], dtype=np.float32)
    chosen = np.zeros(sim.shape[0], dtype=bool)
    order = np.empty(k, dtype=np.int64)
    for r in range(k):
        gains = np.maximum(sim - cover, 0.0).sum(axis=1, dtype=np.float64)
        gains[chosen] = -np.inf
        idx = int(np.argmax(gains))
        order[r] = idx
        chosen[idx] = True
        np.maximum(cover, sim[idx], out=cover)
    return order, float(np.maximum(cover, 0.0).sum(dtype=np.float64))


def max_cover_select(candidate_emb: np.ndarray, pool_emb: np.ndarray, k: int, chunk: int = 256) -> np.ndarray:
    """Greedy max-cover of the pool by candidates under cosine similarity of embeddings; returns candidate order.

    Builds the dense (K, N) similarity matrix when it is small; otherwise recomputes candidate rows chunk by chunk
    at each step (same result, bounded memory, more time).
    """
    cand = cosine_normalize(candidate_emb)
    pool = cosine_normalize(pool_emb)
    if cand.shape[0] * pool.shape[0] <= _MAX_COVER_DENSE_LIMIT:
        return greedy_max_cover(cand @ pool.T, k)[0]
    k = min(k, cand.shape[0])
    cover = np.zeros(pool.shape[0], dtype=np.float32)
    chosen = np.zeros(cand.shape[0], dtype=bool)
    order = np.empty(k, dtype=np.int64)
    for r in range(k):
        gains = np.empty(cand.shape[0], dtype=np.float64)
        for start in range(0, cand.shape[0], chunk):
            rows = cand[start : start + chunk] @ pool.T
            gains[start : start + chunk] = np.maximum(rows - cover, 0.0).sum(axis=1, dtype=np.float64)
        gains[chosen] = -np.inf
        idx = int(np.argmax(gains))
        order[r] = idx
        chosen[idx] = True
        np.maximum(cover, pool @ cand[idx], out=cover)
    return order


@register_strategy("kmeans")
class KMeansStrategy(Strategy):
    """K-means sampling (Bodo et al. 2011; Roels & Saeys 2019, section 3.4).

    Cluster the pool embeddings z = embed(x) into k clusters (scikit-learn KMeans, seeded); select, per cluster, the
    tile closest to its centroid, larger clusters first (they represent more of the pool). If duplicates leave a
    cluster empty, the remaining picks are filled by greedy k-center from the chosen tiles. Unselected tiles' value:
    closeness to their centroid. Forward passes: 1 (embedding from the same encoder pass).
    Parameter ``n_init``: k-means++ restarts (1, scikit-learn's "auto" for k-means++).
    """

    class Params(StrategyParams):
        # each restart is a full k-means on the pool; past a few, the selection barely changes
        n_init: int = Field(1, ge=1, le=20, description="k-means++ restarts; each one costs a full clustering")

    needs = frozenset({"embeddings"})
    summary_keys = ("value", "embedding")
    config: Params

    def __init__(self, **params: object) -> None:
        super().__init__(**params)
        self.n_init = self.config.n_init

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        emb = np.asarray(batch.embeddings, dtype=np.float32)
        return {"value": np.zeros(batch.n, dtype=np.float64), "embedding": emb}

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        x = np.asarray(summary["embedding"], dtype=np.float64)
        n = x.shape[0]
        with warnings.catch_warnings():  # fewer distinct points than k: handled below by the k-center fill
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=k, n_init=self.n_init, random_state=seed).fit(x)
        d_own = np.sqrt(np.maximum(_sq_dists_rows(x, km.cluster_centers_[km.labels_]), 0.0))
        sizes = np.bincount(km.labels_, minlength=k)
        picks: list[int] = []
        for cluster in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero(km.labels_ == cluster)
            if members.size:
                picks.append(int(members[np.argmin(d_own[members])]))
        order = np.asarray(picks, dtype=np.int64)
        if order.size < k:  # degenerate clustering (duplicates): complete by farthest-first from the picks
            rest, _ = k_center_greedy(x, k, x[order], seed=seed) if order.size else k_center_greedy(x, k, seed=seed)
            rest = rest[~np.isin(rest, order)]
            order = np.concatenate([order, rest[: k - order.size]])
        closeness = -d_own if n > 1 else np.zeros(n)
        return Selection(values=batch_values(n, order, closeness), order=order)


def _sq_dists_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    diff = a - b
    return np.einsum("ij,ij->i", diff, diff)


@register_strategy("coreset")
class CoresetStrategy(Strategy):
    """Core-set selection by greedy k-center (Sener & Savarese 2018; Roels & Saeys 2019, section 3.5).

    With labelled embeddings L as initial centres, repeat k times:
        u = argmax_{x in pool} min_{c in L u S} ||z_x - z_c||,   S <- S u {u}.
    This minimises (2-approximately) the covering radius of the pool by the labelled + selected tiles,
    the bound on the core-set loss. Unselected tiles' value: their final distance to the nearest centre.
    Forward passes: 1 (embedding from the same encoder pass). Cost O(k N D).
    """

    needs = frozenset({"embeddings"})
    summary_keys = ("value", "embedding")

    def _summarize(self, batch: PoolBatch) -> dict[str, np.ndarray]:
        emb = np.asarray(batch.embeddings, dtype=np.float32)
        return {"value": np.zeros(batch.n, dtype=np.float64), "embedding": emb}

    def _select(self, summary, k, *, labelled_embeddings, seed) -> Selection:
        x = np.asarray(summary["embedding"], dtype=np.float64)
        order, dist = k_center_greedy(x, k, labelled_embeddings, seed=seed)
        return Selection(values=batch_values(x.shape[0], order, dist), order=order)
