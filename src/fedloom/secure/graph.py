"""The communication graph of a secure-aggregation round.

SecAgg (Bonawitz et al., CCS 2017) shares every client's secrets with every other client:
the complete graph. SecAgg+ (Bell, Bonawitz, Gascón, Lepoint, Raykova, CCS 2020) replaces it
with a sparse random k-regular graph, so each client does O(k) key agreements, shares and
mask expansions instead of O(n); with k = O(log n) the protocol stays secure and robust
against a constant fraction of dropouts with high probability. The graph here is a Harary
graph H(k, n) over a random permutation: clients on a cycle in random order, each joined to
the k/2 nearest on each side, the order drawn from the round's seed (the server's choice; in
the honest-but-curious model the clients accept it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighbours"]


def neighbours(clients: list[str], k: int | None, seed: int) -> dict[str, list[str]]:
    """Each client's neighbours (sorted): the complete graph when ``k`` is None or ≥ n − 1."""
    n = len(clients)
    ordered = sorted(clients)
    if k is None or k >= n - 1:
        return {c: [d for d in ordered if d != c] for c in ordered}
    if k < 2 or k % 2:
        raise ValueError(f"a SecAgg+ degree must be even and >= 2, got {k}")
    perm = np.random.default_rng(seed).permutation(n)
    ring = [ordered[i] for i in perm]
    out: dict[str, set[str]] = {c: set() for c in ordered}
    for i, c in enumerate(ring):
        for d in range(1, k // 2 + 1):
            out[c].add(ring[(i + d) % n])
            out[c].add(ring[(i - d) % n])
    return {c: sorted(v) for c, v in out.items()}
