"""The mixed-batch LoRA math: one gathered forward equals each row run with its own adapter."""

import torch
from helpers import peft_loader

from soppu_hub.serve.lora_ops import gathered_lora, shared_basis_lora, shared_factored_lora, stack_slots


def _rows(n=3, s=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, s, d, generator=g, dtype=torch.float64), g


def test_gathered_plain_loras_equal_one_adapter_per_row():
    x, g = _rows()
    m = 7
    factors = [
        (torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, 12, generator=g, dtype=torch.float64))
        for r in (2, 4)
    ]
    A, B = stack_slots(factors)
    assert A.shape == (2, 4, 12) and B.shape == (2, 7, 4) and not A[0, 2:].any() and not B[0, :, 2:].any()
    slots = torch.tensor([0, 1, 0])  # rows 0 and 2: adapter 0 (rank 2, zero-padded), row 1: adapter 1
    out = gathered_lora(x, A, B, slots)
    for row, adapter in ((0, 0), (1, 1), (2, 0)):
        b, a = factors[adapter]
        torch.testing.assert_close(out[row], x[row] @ a.T @ b.T)


def test_shared_basis_rows_equal_their_reconstructed_adapters():
    x, g = _rows(n=4)
    m, R = 9, 3
    U = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, R, generator=g, dtype=torch.float64))[0]
    cores = torch.randn(3, R, R, generator=g, dtype=torch.float64)
    cores[0] = 0  # slot 0: no adapter
    slots = torch.tensor([2, 1, 0, 2])
    out = shared_basis_lora(x, U, V, cores, slots)
    for row in range(4):
        torch.testing.assert_close(out[row], x[row] @ (U @ cores[slots[row]] @ V.T).T)


def test_factored_cores_give_what_their_dense_products_give():
    """Cores kept as factors S_i = P_i Q_i (ranks 1 and 2, zero-padded to one stack) act as the dense S_i."""
    x, g = _rows(n=3)
    m, R = 9, 5
    U = torch.linalg.qr(torch.randn(m, R, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(12, R, generator=g, dtype=torch.float64))[0]
    pairs = [
        (torch.randn(R, k, generator=g, dtype=torch.float64), torch.randn(k, R, generator=g, dtype=torch.float64))
        for k in (1, 2)
    ]
    Q, P = stack_slots(pairs)
    assert Q.shape == (2, 2, R) and P.shape == (2, R, 2)
    slots = torch.tensor([1, 0, 1])
    dense = torch.stack([p @ q for p, q in pairs])
    torch.testing.assert_close(shared_factored_lora(x, U, V, Q, P, slots), shared_basis_lora(x, U, V, dense, slots))


def test_installed_forward_matches_peft_token_for_token(tmp_path):
    """A real tiny Llama with plain LoRAs of two ranks and three adapters through one JD bundle, all in one
    batch: the gathered forward gives PEFT's logits and the same greedy tokens."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    from lab.samples import build_tiny_llama, llama_module_shapes, synthetic_factors, write_adapter
    from soppu_hub.compression.config import CompressConfig
    from soppu_hub.pipeline.job import compress_folders
    from soppu_hub.serve.peft_patch import install, rows_use
    from soppu_hub.serve.shared_bases import SharedBases

    base_dir = build_tiny_llama(tmp_path / "base")
    shapes = llama_module_shapes()
    folders = []
    for i, (rank, targets) in enumerate([(4, None), (8, ("q_proj", "v_proj")), (8, None), (8, None), (8, None)]):
        sub = {k: v for k, v in shapes.items() if targets is None or k.rsplit(".", 1)[1] in targets}
        f = synthetic_factors(sub, 1, rank, shared=rank // 2, seed=i, scales=[3.0])[0]
        folders.append(write_adapter(tmp_path / f"a{i}", f, base_model=str(base_dir), rank=rank, alpha=2 * rank))
    compress_folders(folders[2:], tmp_path / "jd", CompressConfig(rank=6))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    load = peft_loader(model)
    load(str(folders[0]), "p0")
    peft_model = load(str(folders[1]), "p1")
    shared = SharedBases()
    for j in range(3):
        shared.load(load, tmp_path / "jd" / f"a{j + 2}", f"s{j}")
    names = ["p0", "s0", "__base__", "p1", "s2", "s1", "p0", "s0"]
    ids = torch.randint(5, 300, (len(names), 7), generator=torch.Generator().manual_seed(0))
    whole = [["s0", "s1", "s2", "s0"] * 2, ["p1"] * 8]  # one group or one adapter covering the whole batch
    with torch.no_grad():
        want_whole = [peft_model(input_ids=ids, adapter_names=w).logits for w in whole]
        want = peft_model(input_ids=ids, adapter_names=names).logits
        want_tokens = peft_model.generate(
            input_ids=ids, adapter_names=names, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
        assert install(peft_model) > 0 and install(peft_model) == 0
        layer = next(m for m in peft_model.modules() if isinstance(m, LoraLinear))
        assert layer._mixed_batch_forward.__func__ is not LoraLinear._mixed_batch_forward
        got = peft_model(input_ids=ids, adapter_names=names).logits
        got_tokens = peft_model.generate(
            input_ids=ids, adapter_names=names, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
        for w, expected in zip(whole, want_whole):
            torch.testing.assert_close(
                peft_model(input_ids=ids, adapter_names=w).logits, expected, rtol=1e-5, atol=1e-5
            )
        with rows_use(names):  # the engine's way: no per-call hooks, the same rows
            torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        assert peft_model._soppu_rows_ok
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    with torch.no_grad():
        base = peft_model(input_ids=ids, adapter_names=["__base__"] * len(names)).logits
    moved = (want - base).abs().amax((1, 2))
    assert moved[2] == 0 and (moved[[0, 1, 3, 4, 5, 6, 7]] > 1e-3).all()  # every adapter row is really adapted


def test_engine_batches_embedding_lora_with_plain_adapters(tmp_path):
    """In-process engine, one continuous batch mixing an embedding-LoRA adapter (PEFT's hook path), a plain one
    (the gathered path) and the base model: each row gets the tokens PEFT gives that adapter alone."""
    import threading

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from lab.samples import build_tiny_llama
    from soppu_hub.serve.config import ServeConfig
    from soppu_hub.serve.engine import Engine, Generation
    from soppu_hub.serve.params import GenerateRequest, Sampling

    base_dir = build_tiny_llama(tmp_path / "base")
    for i, (name, targets) in enumerate((("plain", ["q_proj", "v_proj"]), ("embed", ["q_proj", "embed_tokens"]))):
        torch.manual_seed(i)
        m = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base_dir)),
            LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        )
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn(p.shape))
        m.save_pretrained(str(tmp_path / "adapters" / name))
    prompt = list(range(10, 19))

    def alone(name):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir)).eval()
        if name:
            model = PeftModel.from_pretrained(model, str(tmp_path / "adapters" / name)).eval()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        return out[0, len(prompt) :].tolist()

    engine = Engine(base_dir, ServeConfig(str(base_dir), adapter_dir=str(tmp_path / "adapters"), max_batch=8))
    order = ["plain", "embed", None, "embed", "plain"]
    done = threading.Semaphore(0)
    jobs = []
    for name in order:
        adapter, _ = engine.adapters.acquire(name, "local", None)
        request = GenerateRequest(ids=prompt, max_new=12, sampling=Sampling(), stop=[], ignore_eos=True)
        jobs.append(
            Generation(
                request, adapter, emit=lambda kind, payload: done.release() if kind in ("done", "error") else None
            )
        )
    for j in jobs:
        engine.submit(j)
    for _ in jobs:
        assert done.acquire(timeout=120)
    assert not engine.adapters.host.peft._soppu_rows_ok  # the embedding LoRA keeps PEFT's per-row hooks in play
    expected = {name: alone(name) for name in set(order)}
    assert len({tuple(v) for v in expected.values()}) == 3  # the two adapters and the base really differ
    for name, j in zip(order, jobs):
        assert j.tokens == expected[name], name


def test_an_adapter_loaded_again_under_its_name_is_not_served_from_an_old_plan(tmp_path):
    """Plans are kept per batch composition and adapter generation: an adapter deleted and loaded again under the
    same name with other weights (a Hub repo's new revision), then `install` as after every load, must be served
    with the new weights, not the tensors an old plan held."""
    from transformers import AutoModelForCausalLM

    from lab.samples import build_tiny_llama, llama_module_shapes, synthetic_factors, write_adapter
    from soppu_hub.serve.peft_patch import install, rows_use

    base_dir = build_tiny_llama(tmp_path / "base")
    folders = [
        write_adapter(
            tmp_path / f"a{i}",
            synthetic_factors(llama_module_shapes(), 1, 4, shared=2, seed=i, scales=[3.0])[0],
            base_model=str(base_dir),
            rank=4,
            alpha=8,
        )
        for i in range(2)
    ]
    load = peft_loader(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval())
    ids = torch.randint(5, 300, (2, 6), generator=torch.Generator().manual_seed(0))

    def logits(peft_model):
        with torch.no_grad(), rows_use(["x", "x"]):
            return peft_model(input_ids=ids).logits

    load(str(folders[1]), "y")
    peft_model = load(str(folders[0]), "x")
    install(peft_model)
    with torch.no_grad():
        want = peft_model(input_ids=ids, adapter_names=["y", "y"]).logits
    first = logits(peft_model)  # the last plan each layer keeps: x's
    peft_model.delete_adapter("x")
    load(str(folders[1]), "x")  # x's new revision: the weights y has
    install(peft_model)
    assert not torch.allclose(first, want)
    torch.testing.assert_close(logits(peft_model), want)
