"""trime.distributed with 2 real CPU processes (gloo): the gathered trime_long loss (spec §3.2) and
the gathered trime_mt loss (MT spec §4: other sentences of every rank, other ranks' entries constant);
with 2 and 4 processes, real ranks against simulated ranks in one process (losses.simulate_ranks)."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from trime import distributed as D
from trime.losses import LossSettings, MTLossSettings, compute_loss, compute_mt_loss

import reference as ref

B, L, D_MODEL, V, PAD = 2, 4, 6, 9, 1
MT_SETTINGS = {"ip_top5": MTLossSettings(temp=2.0, topk=5, dist="ip", pad=PAD),
               "l2_all": MTLossSettings(temp=3.0, topk=0, dist="l2", pad=PAD)}  # fmt: skip


class TinyLM(nn.Module):
    """A row-independent stand-in for the LM: h and q depend only on the token at the row."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D_MODEL)
        self.to_h = nn.Linear(D_MODEL, D_MODEL)
        self.to_q = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, tokens):
        e = self.emb(tokens)  # (B, L, d)

        class Out:
            h, q = torch.tanh(self.to_h(e)), self.to_q(e)

        return Out


def _setup():
    torch.manual_seed(0)
    model, head = TinyLM(), ref.FakeHead(D_MODEL, V)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, V, (2 * B, L), generator=g)  # both ranks' batches, rank order
    targets = torch.randint(2, V, (2 * B, L), generator=g)
    targets[3, 2] = PAD
    return model, head, tokens, targets


def _params(model, head):
    return list(model.parameters()) + list(head.parameters())


def _mt_params(model, head):  # trime_mt reads h only (its memory key is h itself, MT spec §1)
    return [*model.emb.parameters(), *model.to_h.parameters(), *head.parameters()]


def _join(rank, world, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    D.init()


def _worker(rank, world, port, path):
    _join(rank, world, port)
    model, head, tokens, targets = _setup()
    rows = slice(rank * B, (rank + 1) * B)
    gather = D.make_group_gather(2)
    res = compute_loss("trime_long", model(tokens[rows]), targets[rows], head, gather=gather)
    grads = torch.autograd.grad(res.loss, _params(model, head))
    mt = {}
    for name, settings in MT_SETTINGS.items():  # B target sentences of L positions per rank
        out = compute_mt_loss(settings, model(tokens[rows]), targets[rows], head, gather=gather)
        mt[name] = (out.loss.item(), out.n_targets.item(), torch.autograd.grad(out.loss, _mt_params(model, head)))
    keys = torch.randn(3, 2, requires_grad=True)
    all_keys, all_values, offset, bounds = gather(keys, torch.full((3,), rank))
    (key_grad,) = torch.autograd.grad((all_keys * torch.arange(6.0)[:, None]).sum(), keys)
    varlen = D.all_gather_varlen(torch.arange(2 * (rank + 1) * 3.0).view(-1, 3) + 100 * rank)
    result = {
        "loss": res.loss.item(),
        "n": res.n_targets,
        "grads": [g.clone() for g in grads],
        "mt": mt,
        "offset": offset,
        "bounds": bounds,
        "values": all_values.tolist(),
        "key_grad": key_grad,
        "varlen": varlen,
        "sum": D.all_reduce_sum(3.0 + rank),
        "obj": D.broadcast_object({"r": rank}),
        "objs": D.all_gather_object(rank),
        "world": (D.rank(), D.world_size(), D.is_main()),
    }
    D.barrier()
    torch.save(result, f"{path}/rank{rank}.pt")
    D.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(worker, world, path, start_method="fork"):
    """Run ``worker(rank, world, port, path)`` in ``world`` gloo processes; each rank's saved result.
    fork: the children reuse the imported torch instead of importing it again (seconds on 2 cores);
    spawn where the parent may hold other libraries' threads (a forked child can inherit their locks)."""
    ctx = mp.start_processes(
        worker, args=(world, _free_port(), str(path)), nprocs=world, join=False, start_method=start_method
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world} gloo processes did not finish in 120 s")
    return [torch.load(path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run(_worker, 2, tmp_path_factory.mktemp("dist"))


def test_gathered_trime_long_equals_one_process_over_the_concatenation(ranks):
    model, head, tokens, targets = _setup()
    whole = compute_loss("trime_long", model(tokens), targets, head)
    assert sum(r["loss"] for r in ranks) == pytest.approx(whole.loss.item(), rel=1e-5, abs=1e-5)
    assert sum(r["n"] for r in ranks) == whole.n_targets
    assert [r["offset"] for r in ranks] == [0, 3] and ranks[1]["bounds"] == [0, 6]  # the 3-row gather below


def test_other_ranks_keys_are_constants(ranks):
    model, head, tokens, targets = _setup()
    out = model(tokens)
    N = B * L
    q, y = out.q.reshape(2 * N, -1), targets.reshape(-1)
    for r in range(2):
        rows = slice(r * N, (r + 1) * N)

        def gather(keys, values, r=r, q=q):  # the same stream with the other rank's rows detached
            parts = [keys if s == r else q[s * N : (s + 1) * N].detach() for s in range(2)]
            return torch.cat(parts), y, r * N, [0, 2 * N]

        class Mine:
            h, q = out.h[r * B : (r + 1) * B], out.q[r * B : (r + 1) * B]

        res = compute_loss("trime_long", Mine, targets[r * B : (r + 1) * B], head, gather=gather)
        want = torch.autograd.grad(res.loss, _params(model, head), retain_graph=True)
        for got, w in zip(ranks[r]["grads"], want):
            torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)
        # and the gradient differs from letting rank r's loss reach every key of the stream
        full = compute_loss("trime_long", out, targets, head)  # includes both ranks' queries
        assert full.loss.item() != pytest.approx(res.loss.item())
        assert rows.start == r * N
    for r, res in enumerate(ranks):  # gather: only the local slice carries a gradient
        assert torch.equal(res["key_grad"], torch.arange(6.0)[3 * r : 3 * r + 3, None].expand(3, 2))
        assert res["values"] == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("name", list(MT_SETTINGS))
def test_gathered_trime_mt_equals_one_process_and_keeps_other_ranks_constant(ranks, name):
    """Each rank's queries see every other sentence of both ranks: the two losses sum to the loss of
    one process over all 2B sentences; the gradient of rank r's loss is that of its queries over the
    whole batch with the other rank's decoder outputs detached (no gradient reaches another rank)."""
    settings = MT_SETTINGS[name]
    model, head, tokens, targets = _setup()
    whole = compute_mt_loss(settings, model(tokens), targets, head)
    assert sum(r["mt"][name][0] for r in ranks) == pytest.approx(whole.loss.item(), rel=1e-5, abs=1e-5)
    assert sum(r["mt"][name][1] for r in ranks) == whole.n_targets.item()
    out = model(tokens)
    y = targets.reshape(-1)
    N = B * L
    for r in range(2):

        def gather(keys, values, r=r):
            h = out.h.reshape(2 * N, -1)
            parts = [keys if s == r else h[s * N : (s + 1) * N].detach() for s in range(2)]
            return torch.cat(parts), y, r * N, [0, 2 * N]

        class Mine:
            h, q = out.h[r * B : (r + 1) * B], out.q[r * B : (r + 1) * B]

        res = compute_mt_loss(settings, Mine, targets[r * B : (r + 1) * B], head, gather=gather)
        want = torch.autograd.grad(res.loss, _mt_params(model, head), retain_graph=True)
        for got, w in zip(ranks[r]["mt"][name][2], want):
            torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)
        everywhere = torch.autograd.grad(
            compute_mt_loss(settings, Mine, targets[r * B : (r + 1) * B], head, gather=lambda k, v, r=r: (
                out.h.reshape(2 * N, -1), y, r * N, [0, 2 * N])).loss, _mt_params(model, head), retain_graph=True,
        )  # fmt: skip
        assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(everywhere, want))


def test_varlen_gather_and_small_helpers(ranks):
    for r, res in enumerate(ranks):
        shapes = [tuple(t.shape) for t in res["varlen"]]
        assert shapes == [(2, 3), (4, 3)]
        assert torch.equal(res["varlen"][1], torch.arange(12.0).view(4, 3) + 100)
        assert res["sum"] == 7.0 and res["obj"] == {"r": 0} and res["objs"] == [0, 1]
        assert res["world"] == (r, 2, r == 0)


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 2, requires_grad=True)
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert D.all_gather_varlen(x)[0] is x and D.all_reduce_sum(5) == 5
    keys, values, offset, bounds = D.make_group_gather(1)(x, torch.zeros(3))
    assert keys is x and offset == 0 and bounds == [0, 3]
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model) is model and D.broadcast_object(4) == 4 and D.all_gather_object(4) == [4]


# ---------------------------------------------------------------------------------------------
# Simulated ranks: W real ranks, each with its own segments and the real gather, against one process
# with simulate_ranks=W over all segments, on a real (micro) model: the same summed loss and, for
# every parameter, the sum over ranks of each rank's gradient (what DDP with a sum gives)

SIM_SEGMENTS, SIM_L, SIM_V = 4, 8, 40
SIM_CASES = {  # name: (criterion, cross_sent_ratio (0 or 1: the coins are certain), ranks per memory group; 0: all)
    "long": ("trime_long", 0.0, 0),
    "ext_local": ("trime_ext", 0.0, 0),
    "ext_hidden": ("trime_ext", 1.0, 0),
}
SIM_GROUPS_4 = {"long_groups_of_2": ("trime_long", 0.0, 2)}  # only with 4 ranks: two groups of two


def _sim_cases(world):
    return {**SIM_CASES, **(SIM_GROUPS_4 if world == 4 else {})}


def _micro_setup():
    from trime import config as C
    from trime.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(C.build(C.ModelConfig, C.load_preset("micro")["model"], {"vocab_size": SIM_V}))
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(4, SIM_V, (SIM_SEGMENTS, SIM_L), generator=g)  # every rank's segments, rank order
    targets = torch.randint(4, SIM_V, (SIM_SEGMENTS, SIM_L), generator=g)
    targets[2, 5] = PAD
    return model, tokens, targets


def _grads(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]


def _sim_worker(rank, world, port, path):
    _join(rank, world, port)
    model, tokens, targets = _micro_setup()
    cases = _sim_cases(world)
    gathers = {c: D.make_group_gather(c or world) for c in sorted({c for _, _, c in cases.values()})}
    b = SIM_SEGMENTS // world
    rows = slice(rank * b, (rank + 1) * b)
    result = {}
    for name, (crit, ratio, group) in cases.items():
        settings = LossSettings(crit, pad=PAD, cross_sent_ratio=ratio)
        res = compute_loss(settings, model(tokens[rows]), targets[rows], model.head, gather=gathers[group])
        result[name] = (res.loss.item(), res.n_targets.item(), _grads(res.loss, model))
    D.barrier()
    torch.save(result, f"{path}/rank{rank}.pt")
    D.cleanup()


def _check_simulation(ranks):
    world = len(ranks)
    model, tokens, targets = _micro_setup()
    for name, (crit, ratio, group) in _sim_cases(world).items():
        settings = LossSettings(crit, pad=PAD, cross_sent_ratio=ratio, simulate_ranks=world, simulate_group=group)
        res = compute_loss(settings, model(tokens), targets, model.head)
        want = _grads(res.loss, model)
        assert sum(r[name][0] for r in ranks) == pytest.approx(res.loss.item(), rel=1e-5, abs=1e-6), name
        assert sum(r[name][1] for r in ranks) == res.n_targets.item()
        for i, w in enumerate(want):
            got = sum(r[name][2][i] for r in ranks)
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6, msg=lambda m, name=name, i=i: f"{name} #{i}: {m}")
        if crit == "trime_long" and not group:  # the one-process gradient reaches other ranks' keys too
            plain = _grads(compute_loss(LossSettings(crit, pad=PAD), model(tokens), targets, model.head).loss, model)
            assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(plain, want))


def test_two_real_ranks_equal_two_simulated_ranks(tmp_path):
    _check_simulation(_run(_sim_worker, 2, tmp_path))


@pytest.mark.slow  # > 3 s on 2 cores: a whole job or several processes
def test_four_real_ranks_equal_four_simulated_ranks(tmp_path):
    _check_simulation(_run(_sim_worker, 4, tmp_path))


# ---------------------------------------------------------------------------------------------
# A Hugging Face backbone (a tiny random Llama) trained with TRIME as trime.train does it on 2 ranks: the
# Objective in DDP, each rank with its half of the global batch. The ranks' losses sum to the loss of one
# process over the whole batch, and the gradient DDP leaves on every rank, times the world size, is that
# process's gradient: of the same loss for trime (memories within a segment), of the loss with the other
# rank's keys as constants (simulate_ranks) for trime_long, whose memory is both ranks' batches.

HF_B, HF_L = 4, 6
HF_CASES = {"trime": 1, "trime_long": 0}  # criterion: ranks per memory group (0: all)


def _hf_setup():
    import transformers

    from trime.model.hf import HFBackbone

    cfg = transformers.LlamaConfig(
        vocab_size=SIM_V, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16,
    )  # fmt: skip
    torch.manual_seed(0)
    backbone = HFBackbone(transformers.AutoModelForCausalLM.from_config(cfg)).train()
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(4, SIM_V, (HF_B, HF_L), generator=g)  # the global batch, rank order
    targets = torch.randint(4, SIM_V, (HF_B, HF_L), generator=g)
    targets[1, 3] = PAD
    return backbone, tokens, targets


def _hf_worker(rank, world, port, path):
    from trime.train import Objective

    _join(rank, world, port)
    result = {}
    for crit, group in HF_CASES.items():
        backbone, tokens, targets = _hf_setup()  # a fresh model per DDP wrapper
        gather = D.make_group_gather(group or world) if group != 1 else None
        wrapped = D.wrap_ddp(Objective(backbone, LossSettings(crit, pad=PAD), seed=0, gather=gather))
        rows = slice(rank * HF_B // world, (rank + 1) * HF_B // world)
        loss, n, *_ = wrapped(tokens[rows], targets[rows])
        loss.backward()  # DDP averages the gradient over the ranks
        result[crit] = (loss.item(), n.item(), [p.grad.clone() for p in backbone.parameters()])
    D.barrier()
    torch.save(result, f"{path}/rank{rank}.pt")
    D.cleanup()


def test_two_ranks_train_a_hugging_face_backbone_like_one_process(tmp_path):
    pytest.importorskip("transformers")
    ranks = _run(_hf_worker, 2, tmp_path, "spawn")  # transformers' and tqdm's threads: no fork
    for crit, group in HF_CASES.items():
        backbone, tokens, targets = _hf_setup()
        settings = LossSettings(crit, pad=PAD, simulate_ranks=2 if crit != "trime" else 1, simulate_group=group)
        whole = compute_loss(settings, backbone(tokens), targets, backbone.head)
        want = torch.autograd.grad(whole.loss, list(backbone.parameters()))
        assert sum(r[crit][0] for r in ranks) == pytest.approx(whole.loss.item(), rel=1e-5), crit
        assert sum(r[crit][1] for r in ranks) == whole.n_targets.item() == HF_B * HF_L - 1
        for i, w in enumerate(want):
            for r in ranks:  # every rank holds the same averaged gradient
                torch.testing.assert_close(
                    2 * r[crit][2][i], w, rtol=1e-4, atol=1e-6, msg=lambda m, c=crit, i=i: f"{c} #{i}: {m}"
                )
