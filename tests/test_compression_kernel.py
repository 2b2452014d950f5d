"""The kernel against dense brute-force references on small shapes."""

import pytest
import torch

from soppu_hub.compression.jd import joint_diagonalize
from soppu_hub.compression.scoring import reconstruction_sq_errors


def factors(L, n, m, d, k, seed=0, scales=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(L, n, m, k, generator=g, dtype=dtype)
    A = torch.randn(L, n, k, d, generator=g, dtype=dtype)
    if scales is not None:
        B = B * torch.tensor(scales, dtype=dtype)[None, :, None, None]
    return B, A


def dense_rel_errors(B, A, res):
    W = B.double() @ A.double()
    R = res.U.double().unsqueeze(1) @ res.dense_cores().double() @ res.V.double().unsqueeze(1).mT
    return (W - R).flatten(-2).norm(dim=-1) / W.flatten(-2).norm(dim=-1)


def dense_jd_objective(W, r, iters=500):
    """Brute-force weighted JD-Full on dense matrices: alternating top-eigenvectors of m x m / d x d Grams."""
    w = 1.0 / W.flatten(-2).pow(2).sum(-1)
    V = torch.linalg.svd((w[:, None, None] ** 0.5 * W).reshape(-1, W.shape[-1]))[2][:r].T
    for _ in range(iters):
        M = sum(wi * Wi @ V @ V.T @ Wi.T for wi, Wi in zip(w, W))
        U = torch.linalg.eigh(M)[1][:, -r:]
        N = sum(wi * Wi.T @ U @ U.T @ Wi for wi, Wi in zip(w, W))
        V = torch.linalg.eigh(N)[1][:, -r:]
    errs = [(Wi - U @ U.T @ Wi @ V @ V.T).norm() / Wi.norm() for Wi in W]
    return torch.stack(errs)


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize("m,d,k,r", [(40, 30, 6, 3), (12, 50, 8, 5), (9, 7, 16, 4)])
def test_single_adapter_is_optimal_truncated_svd(method, m, d, k, r):
    B, A = factors(3, 1, m, d, k, seed=m)
    res = joint_diagonalize(B, A, r, method=method, dtype=torch.float64)
    s = torch.linalg.svdvals(B[:, 0] @ A[:, 0])
    optimal = (s[:, r:].pow(2).sum(-1) / s.pow(2).sum(-1)).sqrt()
    torch.testing.assert_close(res.rel_errors[:, 0], optimal, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res.rel_errors, dense_rel_errors(B, A, res), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_error_when_rank_covers_all_adapters(dtype):
    B, A = factors(2, 3, 64, 48, 4, seed=1)
    res = joint_diagonalize(B, A, 12, dtype=dtype)
    assert res.rank == 12
    assert res.rel_errors.max() < (1e-5 if dtype == torch.float32 else 1e-7)
    assert dense_rel_errors(B, A, res).max() < 1e-5


def test_errors_match_dense_reconstruction_and_dense_jd():
    B, A = factors(2, 4, 30, 25, 5, seed=2)
    res = joint_diagonalize(B, A, 6, dtype=torch.float64, tol=1e-12, max_iter=2000)
    torch.testing.assert_close(res.rel_errors, dense_rel_errors(B, A, res), atol=1e-8, rtol=1e-8)
    W = B @ A
    w = 1 / W.flatten(-2).pow(2).sum(-1)
    recon = res.U.unsqueeze(1) @ res.dense_cores() @ res.V.unsqueeze(1).mT
    ours = (w * (W - recon).flatten(-2).pow(2).sum(-1)).sum(-1)  # the weighted objective, from dense matrices
    for layer in range(2):
        ref = dense_jd_objective(W[layer], 6).pow(2).sum()
        assert ours[layer] <= ref + 1e-6, (ours[layer], ref)


def test_weighting_keeps_a_300x_smaller_adapter():
    B, A = factors(4, 2, 64, 64, 8, seed=3, scales=[300.0, 1.0])
    # share half of the subspace so a joint basis is meaningful
    B[:, 1, :, :2] = B[:, 0, :, :2] / 300.0
    A[:, 1, :2] = A[:, 0, :2]
    weighted = joint_diagonalize(B, A, 8, weights="norm")
    unweighted = joint_diagonalize(B, A, 8, weights="none")
    assert unweighted.rel_errors[:, 1].min() > 0.85  # the seeds' objective sacrifices the small adapter
    assert weighted.rel_errors[:, 1].max() < 0.6
    assert weighted.rel_errors.max() < unweighted.rel_errors.max()
    assert (weighted.rel_errors**2).sum() < (unweighted.rel_errors**2).sum()


def test_diag_stores_r_values_per_adapter_and_is_no_better_than_full():
    B, A = factors(3, 3, 32, 24, 4, seed=4)
    full = joint_diagonalize(B, A, 6, method="full")
    diag = joint_diagonalize(B, A, 6, method="diag")
    assert diag.cores.shape == (3, 3, 6)
    assert full.cores.shape == (3, 3, 6, 6)
    assert (diag.rel_errors**2).sum() >= (full.rel_errors**2).sum() - 1e-5
    torch.testing.assert_close(
        diag.rel_errors, dense_rel_errors(B, A, diag).to(diag.rel_errors.dtype), atol=1e-5, rtol=1e-4
    )


def test_batched_over_layers_equals_per_layer():
    B, A = factors(5, 3, 48, 40, 4, seed=5)
    # a fixed number of iterations, so both runs take exactly the same steps
    batched = joint_diagonalize(B, A, 5, dtype=torch.float64, tol=0.0, max_iter=40)
    for layer in range(5):
        single = joint_diagonalize(
            B[layer : layer + 1], A[layer : layer + 1], 5, dtype=torch.float64, tol=0.0, max_iter=40
        )
        torch.testing.assert_close(single.rel_errors[0], batched.rel_errors[layer], atol=1e-7, rtol=1e-6)
        recon = lambda r: r.U[0] @ r.dense_cores()[0] @ r.V[0].T  # noqa: E731
        torch.testing.assert_close(
            recon(single), batched.U[layer] @ batched.dense_cores()[layer] @ batched.V[layer].T, atol=1e-6, rtol=1e-5
        )


def test_rank_is_not_clipped_to_lora_rank_and_mixed_ranks():
    B, A = factors(1, 3, 40, 40, 4, seed=6)
    B[:, 2, :, 2:] = 0  # adapter 2 has rank 2, zero-padded
    A[:, 2, 2:] = 0
    low = joint_diagonalize(B, A, 4)
    high = joint_diagonalize(B, A, 8)
    assert high.rank == 8
    assert (high.rel_errors**2).sum() < (low.rel_errors**2).sum()
    exact = joint_diagonalize(B, A, 10)
    assert exact.rank == 10 and exact.rel_errors.max() < 1e-5


def test_reduced_and_unreduced_paths_agree():
    # n*k = 24 >= m = 20 (no reduction on the B side) but < d = 60
    B, A = factors(1, 3, 20, 60, 8, seed=7)
    res = joint_diagonalize(B, A, 6, dtype=torch.float64, tol=1e-12, max_iter=2000)
    torch.testing.assert_close(res.rel_errors, dense_rel_errors(B, A, res), atol=1e-8, rtol=1e-8)
    assert res.U.shape == (1, 20, 6) and res.V.shape == (1, 60, 6)
    assert torch.allclose(res.U[0].T @ res.U[0], torch.eye(6, dtype=torch.float64), atol=1e-10)


def test_deterministic_and_reports_convergence():
    B, A = factors(2, 3, 30, 30, 4, seed=8, dtype=torch.float32)
    a = joint_diagonalize(B, A, 5)
    b = joint_diagonalize(B, A, 5)
    assert torch.equal(a.U, b.U) and torch.equal(a.cores, b.cores)
    assert a.converged and 1 <= a.iterations < 200
    capped = joint_diagonalize(B, A, 5, tol=0.0, max_iter=3)
    assert capped.iterations == 3 and not capped.converged


def test_bf16_inputs_and_zero_adapter():
    B, A = factors(1, 2, 16, 16, 4, seed=9, dtype=torch.float32)
    B[:, 1] = 0  # an untrained LoRA: B = 0
    res = joint_diagonalize(B.bfloat16(), A.bfloat16(), 4)
    assert res.rel_errors[0, 1] == 0
    assert res.rel_errors[0, 0] < 1e-5
    assert torch.isfinite(res.U).all()


def test_reconstruction_error_formula_is_exact_for_non_orthonormal_bases():
    B, A = factors(1, 2, 10, 8, 3, seed=10)
    g = torch.Generator().manual_seed(0)
    U, V = (
        torch.randn(1, 10, 4, generator=g, dtype=torch.float64),
        torch.randn(1, 8, 4, generator=g, dtype=torch.float64),
    )
    S = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64)
    dense = ((B @ A) - U.unsqueeze(1) @ S @ V.unsqueeze(1).mT).flatten(-2).pow(2).sum(-1)
    torch.testing.assert_close(reconstruction_sq_errors(B, A, U, V, S), dense)


def planted(L, n, m, d, k, shared, seed=0, noise=0.05, dtype=torch.float64):
    """Adapters whose deltas share a `shared`-dimensional column and row space, plus noise."""
    g = torch.Generator().manual_seed(seed)
    Us = torch.linalg.qr(torch.randn(m, shared, generator=g, dtype=dtype))[0]
    Vs = torch.linalg.qr(torch.randn(d, shared, generator=g, dtype=dtype))[0]
    B = Us @ torch.randn(L, n, shared, k, generator=g, dtype=dtype) + noise * torch.randn(
        L, n, m, k, generator=g, dtype=dtype
    )
    A = torch.randn(L, n, k, shared, generator=g, dtype=dtype) @ Vs.T + noise * torch.randn(
        L, n, k, d, generator=g, dtype=dtype
    )
    return B, A


def weighted_objective(B, A, res):
    """sum_i w_i ||U^T W_i V||^2 with w_i = 1 / ||W_i||^2: what both solvers maximise."""
    W = B.double() @ A.double()
    P = res.U.double().mT.unsqueeze(1) @ W @ res.V.double().unsqueeze(1)
    return (P.pow(2).sum((-2, -1)) / W.pow(2).sum((-2, -1))).sum(-1)


@pytest.mark.parametrize("method", ["full", "diag"])
@pytest.mark.parametrize(
    "L,n,m,d,k,shared,r", [(2, 12, 60, 40, 4, 8, 6), (1, 30, 48, 64, 8, 10, 10), (3, 5, 30, 30, 6, 4, 4)]
)
def test_subspace_solver_reaches_the_exact_solver_s_optimum(method, L, n, m, d, k, shared, r):
    B, A = planted(L, n, m, d, k, shared, seed=n)
    exact = joint_diagonalize(B, A, r, method=method, solver="exact", dtype=torch.float64, tol=1e-12, max_iter=3000)
    sub = joint_diagonalize(B, A, r, method=method, solver="subspace", dtype=torch.float64, tol=1e-12, max_iter=3000)
    assert exact.converged and sub.converged
    torch.testing.assert_close(weighted_objective(B, A, sub), weighted_objective(B, A, exact), rtol=1e-6, atol=0)
    torch.testing.assert_close(sub.rel_errors, exact.rel_errors, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sub.rel_errors, dense_rel_errors(B, A, sub), atol=1e-8, rtol=1e-8)
    assert torch.allclose(sub.U.mT @ sub.U, torch.eye(r, dtype=torch.float64).expand(L, r, r), atol=1e-10)


def test_subspace_solver_for_one_adapter_is_the_truncated_svd():
    B, A = factors(2, 1, 40, 30, 12, seed=3)
    res = joint_diagonalize(B, A, 5, solver="subspace", dtype=torch.float64, tol=1e-14, max_iter=5000)
    s = torch.linalg.svdvals(B[:, 0] @ A[:, 0])
    best = (s[:, 5:].pow(2).sum(-1) / s.pow(2).sum(-1)).sqrt()
    torch.testing.assert_close(res.rel_errors[:, 0], best, atol=1e-7, rtol=1e-7)


def test_subspace_solver_never_decreases_the_objective_and_is_deterministic():
    B, A = planted(1, 40, 64, 64, 8, 16, seed=5, noise=0.3, dtype=torch.float32)
    objs = [
        float(weighted_objective(B, A, joint_diagonalize(B, A, 8, solver="subspace", tol=0.0, max_iter=j))[0])
        for j in range(1, 16)
    ]
    assert all(b >= a - 1e-5 * abs(a) for a, b in zip(objs, objs[1:])), objs
    assert objs[-1] > objs[0]
    a = joint_diagonalize(B, A, 8, solver="subspace")
    b = joint_diagonalize(B, A, 8, solver="subspace")
    assert torch.equal(a.U, b.U) and torch.equal(a.cores, b.cores)


def test_auto_takes_the_solver_its_cost_model_prices_lower():
    from soppu_hub.compression.jd import solver_costs

    many = planted(1, 40, 256, 192, 4, 6, seed=1, dtype=torch.float32)  # n k = 160 against r = 6: subspace
    few = planted(1, 3, 64, 48, 4, 6, seed=1, dtype=torch.float32)  # n k = 12: the exact K-sized problem is tiny
    costs_many, costs_few = solver_costs(40, 4, 256, 192, 6), solver_costs(3, 4, 64, 48, 6)
    assert costs_many["subspace"] < costs_many["exact"] and costs_few["exact"] < costs_few["subspace"]
    assert torch.equal(joint_diagonalize(*many, 6).U, joint_diagonalize(*many, 6, solver="subspace").U)
    assert torch.equal(joint_diagonalize(*few, 6).U, joint_diagonalize(*few, 6, solver="exact").U)
    assert solver_costs(40, 4, 20, 192, 12)["subspace"] == float("inf")  # 2 r > m: no room for the Ritz block


def test_module_positions_converge_on_their_own():
    """A position that settles early leaves the batch: its result is what it gets alone, batched or not."""
    B, A = planted(3, 30, 96, 80, 4, 8, seed=7, noise=0.3, dtype=torch.float32)
    for solver in ("exact", "subspace"):
        together = joint_diagonalize(B, A, 8, solver=solver)
        for i in range(3):
            alone = joint_diagonalize(B[i : i + 1], A[i : i + 1], 8, solver=solver)
            proj = together.U[i] @ together.U[i].mT
            torch.testing.assert_close(proj, alone.U[0] @ alone.U[0].mT, atol=1e-4, rtol=0)
            torch.testing.assert_close(together.rel_errors[i : i + 1], alone.rel_errors, atol=1e-5, rtol=0)
            assert alone.iterations <= together.iterations
