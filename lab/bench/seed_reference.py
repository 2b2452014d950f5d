"""A faithful re-implementation of the SOPPU seeds' Algorithm 1 and pipeline, for side-by-side timing only.

What it keeps from the seeds on purpose: dense m x m / d x d products formed left to right, random
(seeded here, so runs repeat) init, exactly 100 iterations with no convergence test, U and V updated by
QR of M U and N V, no weighting, the rank clipped to the LoRA rank, float64 numpy as their code ran.
Errors are scored correctly (each adapter against its own core) by the caller.

Run as a script it is the seeds' whole pipeline: read files, compress every q/v projection, save.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np

_KEY = re.compile(r"layers\.(\d+)\.self_attn\.(\w+)_proj\.lora_([AB])\.weight")


def seed_jd(As: list[np.ndarray], Bs: list[np.ndarray], r: int, iters: int = 100, seed: int = 0):
    """Algorithm 1 of the seeds for one module: returns U (m x r), V (d x r), cores U^T B A V."""
    m, k = Bs[0].shape
    d = As[0].shape[1]
    r = min(r, k, m, d)
    rng = np.random.default_rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((m, r)))
    V, _ = np.linalg.qr(rng.standard_normal((d, r)))
    for _ in range(iters):
        M = sum(B @ A @ V @ V.T @ A.T @ B.T for A, B in zip(As, Bs))
        U_new, _ = np.linalg.qr(M @ U)
        N = sum(A.T @ B.T @ U @ U.T @ B @ A for A, B in zip(As, Bs))
        V_new, _ = np.linalg.qr(N @ V)
        U, V = U_new, V_new
    return U, V, [U.T @ B @ A @ V for A, B in zip(As, Bs)]


def load_pairs(path: str, layers: int | None) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    from safetensors import safe_open

    groups: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    with safe_open(path, framework="numpy") as f:
        for key in f.keys():
            hit = _KEY.search(key)
            if hit and (layers is None or int(hit[1]) < layers):
                groups.setdefault((int(hit[1]), hit[2]), {})[hit[3]] = f.get_tensor(key)
    return {g: (ab["A"], ab["B"]) for g, ab in groups.items() if len(ab) == 2}


def seed_pipeline(files: list[str], out: str, rank: int, layers: int | None = None) -> dict:
    """Load, compress every module position jointly across files, save; returns the factors per module."""
    from safetensors.numpy import save_file

    loaded = [load_pairs(f, layers) for f in files]
    result, tensors = {}, {}
    for key in sorted(loaded[0]):
        As = [ad[key][0] for ad in loaded]
        Bs = [ad[key][1] for ad in loaded]
        U, V, S = seed_jd(As, Bs, rank)
        result[key] = (U, V, S)
        base = f"layers.{key[0]}.{key[1]}_proj"
        tensors[f"{base}.U"], tensors[f"{base}.V"] = U.astype(np.float32), V.T.astype(np.float32).copy()
        for i, s in enumerate(S):
            tensors[f"{base}.S_{i}"] = s.astype(np.float32)
    save_file(tensors, out)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", type=int, default=None)
    args = p.parse_args()
    t = time.perf_counter()
    seed_pipeline(args.files, args.out, args.rank, args.layers)
    print(f"{time.perf_counter() - t:.3f}")


if __name__ == "__main__":
    main()
