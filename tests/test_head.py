"""Draft heads (static and online) and the draft-model speculator, on tiny models."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from adaspec.control.base import FixedController
from adaspec.engine import Engine
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.speculators.base import DecodeContext
from adaspec.speculators.draft_model import DraftModelConfig, DraftModelSpeculator
from adaspec.speculators.head import EVAL_CHUNK, HeadSpeculator, OnlineConfig, OnlineHeadSpeculator
from adaspec.speculators.head_model import (DraftConfig, DraftHead, HeadConfig, LMHead, distill_loss, draft_with_head,
                                            load_checkpoint, save_checkpoint, target_fingerprint)
from adaspec.train.data import Sequence_
from adaspec.train.static import TrainConfig, evaluate, train_step
from adaspec.train.teacher import from_sequences
from adaspec.verify import SamplingParams

GREEDY = SamplingParams(max_tokens=30, temperature=0.0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread avoids OpenMP start-up and oversubscription on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(vocab: int = 64, d: int = 32, layers: int = 2) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=64, num_layers=layers, num_heads=4,
                       num_kv_heads=2, max_context=256)


@pytest.fixture(scope="module")
def target() -> LlamaModel:
    return LlamaModel.random(tiny_cfg(), seed=1)


def random_head(model: LlamaModel, seed: int = 0, vocab: int | None = 48) -> DraftHead:
    torch.manual_seed(seed)
    ids = None if vocab is None else torch.arange(vocab)
    head = DraftHead(HeadConfig(model.hidden_size, 64, 1), model.embed, ids)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def cycle(vocab: int = 40, seed: int = 0) -> list[int]:
    """perm[x] = the token after x on one random cycle through the whole vocabulary."""
    order = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed)).tolist()
    perm = [0] * vocab
    for a, b in zip(order, order[1:] + order[:1]):
        perm[a] = b
    return perm


def bigram_target(vocab: int = 40, d: int = 48, seed: int = 0,
                  perm: list[int] | None = None) -> tuple[LlamaModel, list[int]]:
    """A target whose greedy next token is perm[x]: layers contribute nothing, the LM head permutes.

    With the default one cycle through the whole vocabulary, greedy output
    repeats a fixed pattern that a head must learn (its untrained guess is the
    current token's row).
    """
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=16, num_layers=1, num_heads=4,
                      num_kv_heads=2, max_context=512, tie_word_embeddings=False)
    g = torch.Generator().manual_seed(seed)
    perm = perm if perm is not None else cycle(vocab, seed)
    embed = torch.randn(vocab, d, generator=g)
    lm_head = torch.zeros(vocab, d)
    for x in range(vocab):
        lm_head[perm[x]] = embed[x]  # logits[perm[x]] = <emb x, h> is the largest when h ~ emb x
    w = {"model.embed_tokens.weight": embed, "model.norm.weight": torch.ones(d), "lm_head.weight": lm_head}
    p = "model.layers.0."
    hd = d // 4
    w.update({p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
              p + "self_attn.q_proj.weight": torch.zeros(4 * hd, d), p + "self_attn.k_proj.weight": torch.zeros(2 * hd, d),
              p + "self_attn.v_proj.weight": torch.zeros(2 * hd, d), p + "self_attn.o_proj.weight": torch.zeros(d, 4 * hd),
              p + "mlp.gate_proj.weight": torch.zeros(16, d), p + "mlp.up_proj.weight": torch.zeros(16, d),
              p + "mlp.down_proj.weight": torch.zeros(d, 16)})
    return LlamaModel(cfg, w), perm


def plain(model: LlamaModel, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return Engine(model, None, [], FixedController(0)).generate(prompt, params).tokens


# ---------------------------------------------------------------------------------------------
# The network and its training
# ---------------------------------------------------------------------------------------------

def test_head_shapes_backward_and_shared_weights(target):
    head = random_head(target)
    h = torch.randn(5, 32)
    toks = torch.randint(0, 64, (5,))
    f = head(h, toks)
    assert f.shape == (5, 32)
    assert head.logits(f).shape == (5, 48)
    assert head.unroll(h, torch.randint(0, 64, (5, 3))).shape == (5, 3, 32)
    loss, stats = distill_loss(head, f, torch.randn(5, 32))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert not target.embed.requires_grad and target.embed.grad is None
    assert not any(k.startswith("_") or "embed" in k for k in head.state_dict())  # the embedding is shared, not saved
    assert head.embed is target.embed
    assert 0.0 <= stats["top1"] <= 1.0
    with pytest.raises(ValueError):
        DraftHead(HeadConfig(16), target.embed)  # wrong width
    with pytest.raises(ValueError):
        DraftHead(HeadConfig(32), target.embed, torch.tensor([0, 99]))  # id outside the vocabulary


def test_training_steps_lower_the_loss(target):
    g = torch.Generator().manual_seed(0)
    data = from_sequences(target, [Sequence_(str(i), torch.randint(0, 64, (30,), generator=g).tolist(), [True] * 30)
                                   for i in range(4)])
    head = random_head(target, vocab=None)
    cfg = TrainConfig(unroll=2, batch_size=32)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    g = torch.arange(0, 60, 2)
    before, _ = train_step(head, data, g, cfg)
    for _ in range(15):
        loss, _ = train_step(head, data, g, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = train_step(head, data, g, cfg)
    assert after.item() < 0.8 * before.item()
    ev = evaluate(head, data, depth=2, max_positions=100)
    assert len(ev["depth_acceptance"]) == 2 and ev["positions"] > 0


# ---------------------------------------------------------------------------------------------
# Drafting is lossless
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 3])
def test_head_drafting_is_lossless(target, width):
    spec = HeadSpeculator(random_head(target), DraftConfig(width=width, max_depth=4, min_path_prob=0.0))
    for prompt in ([1, 2, 3], [7, 30, 11, 5]):
        ref = plain(target, prompt)
        gen = Engine(target, None, [spec], FixedController(6)).generate(prompt, GREEDY)
        assert gen.tokens == ref
        assert gen.stats.drafted > 0
    assert spec.proposals > 0


def test_tree_draft_is_best_first_and_well_formed(target):
    head = random_head(target)
    lm = LMHead(head.lm_weight, quantize=False)
    d = draft_with_head(head, lm, head.vocab_ids, torch.randn(32), 5, 7, DraftConfig(width=3, max_depth=3,
                                                                                      min_path_prob=0.0), "head")
    assert len(d) == 7 and not d.is_chain
    assert set(d.tokens.tolist()) <= set(range(48))  # only draft-vocabulary ids
    path = d.path_probs
    kept_min = path.min()
    assert np.all(path[d.parents[d.parents >= 0]] >= path[d.parents >= 0])  # parents at least as likely
    # best-first: no discarded depth-1 child would beat a kept node
    chain = draft_with_head(head, lm, head.vocab_ids, torch.randn(32), 5, 4, DraftConfig(width=1), "head")
    assert chain.is_chain and kept_min >= 0


# ---------------------------------------------------------------------------------------------
# Online learning
# ---------------------------------------------------------------------------------------------

def test_online_head_learns_a_repeating_domain():
    model, perm = bigram_target()
    head = DraftHead(HeadConfig(model.hidden_size, 64, 1), model.embed, None,
                     output=model.lm_head.weight)  # untrained static head
    spec = OnlineHeadSpeculator(head, DraftConfig(width=1, max_depth=4, min_path_prob=0.0),
                                OnlineConfig(background=False, lr=1e-2, min_new_pairs=8, batch_size=32, passes=3.0))
    engine = Engine(model, None, [spec], FixedController(4))
    params = SamplingParams(max_tokens=40, temperature=0.0)

    def accepted(prompt: list[int]) -> float:
        gen = engine.generate(prompt, params)
        assert gen.tokens == plain(model, prompt, params)  # still lossless while learning
        return gen.stats.mean_accepted

    with torch.inference_mode():  # a server may decode under inference mode: the learner must still train
        before = accepted([3])
    for i in range(5):
        accepted([i + 5])
        spec.learn_now()
    after = accepted([17])
    assert spec.updates > 0 and spec.version > 0 and spec.resets == 0
    assert after > before + 1.0, (before, after)
    st = spec.guard_stats()
    assert st["online_top1"] > st["static_top1"]


def test_online_drift_guard_resets_to_static(target):
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False, guard_window=32,
                                                                            min_new_pairs=1))
    with torch.no_grad():  # sabotage the online copy: it can never agree with anything
        for p in spec._train.parameters():
            p.mul_(0)
    spec.publish()
    spec.updates = 1
    h = torch.randn(40, 32)
    t = torch.randint(0, 48, (40,))
    static_top1 = spec._top1(spec.static, h, t)
    spec._evaluate(h, t, static_top1)  # the static head is right on all of them, the zeroed one is not
    assert spec.resets == 1 and spec.head is spec.static


def test_background_learner_updates_without_blocking(target):
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(min_new_pairs=4, batch_size=8,
                                                                            max_share=0.5, publish_every=1))
    try:
        engine = Engine(target, None, [spec], FixedController(4))
        for i in range(3):
            engine.generate([i + 1, 2], GREEDY)
        deadline = threading.Event()
        for _ in range(100):
            if spec.version > 0:
                break
            deadline.wait(0.05)
        assert spec.updates > 0 and spec.version > 0
        assert spec.compute_s > 0
    finally:
        spec.close()
    assert spec._thread is None


def test_decoding_never_waits_for_a_slow_learner(target, monkeypatch):
    """A unit of learner work that takes a second (a stand-in for a slow machine) runs while the engine decodes:
    no step waits for it."""
    started, release = threading.Event(), threading.Event()

    def slow_update(self, n_new: int) -> None:
        started.set()
        release.wait(1.0)

    monkeypatch.setattr(OnlineHeadSpeculator, "_update", slow_update)
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(min_new_pairs=4, batch_size=8,
                                                                            max_share=0.5))
    try:
        engine = Engine(target, None, [spec], FixedController(4))
        for i in range(12):  # more pairs than one unit digests
            engine.generate([i + 1, 2], GREEDY)
        assert started.wait(10)
        t0 = time.perf_counter()
        g = engine.generate([3, 4], GREEDY)
        took = time.perf_counter() - t0
        assert not release.is_set() and took < 0.5, f"decoding {len(g.tokens)} tokens took {took:.2f} s"
    finally:
        release.set()
        spec.close()


def test_one_unit_of_learner_work_digests_one_chunk(target):
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False, min_new_pairs=4,
                                                                            batch_size=8))
    engine = Engine(target, None, [spec], FixedController(4))
    for i in range(12):
        engine.generate([i + 1, 2], GREEDY)
    queued = len(spec._pending)
    assert queued > EVAL_CHUNK
    assert spec._step_once()
    assert len(spec._pending) == queued - EVAL_CHUNK and spec.updates == 1


def test_no_online_learning_where_it_would_share_decodings_cores(target, monkeypatch, caplog):
    """With every core decoding, the adaptive engine leaves the online head out and says so once; with a core to
    spare it learns."""
    from adaspec import system
    from adaspec.speculators import head as head_module

    static = HeadSpeculator(random_head(target))
    monkeypatch.setattr(HeadSpeculator, "for_target", classmethod(lambda cls, model, *a, **k: static))
    monkeypatch.setattr(OnlineHeadSpeculator, "for_target",
                        classmethod(lambda cls, model, *a, **k: cls(random_head(target),
                                                                    online=OnlineConfig(background=False))))
    monkeypatch.setattr(system, "_told", set())
    monkeypatch.setattr(head_module, "spare_core", lambda: False)
    with caplog.at_level("WARNING", logger="adaspec"):
        names = [[s.name for s in system.build_engine(target, None, "adaptive").speculators] for _ in range(2)]
    assert all("head" in n and "head_online" not in n for n in names)
    assert sum("online draft-head learning is off" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(head_module, "spare_core", lambda: True)
    engine = system.build_engine(target, None, "adaptive")
    try:
        assert "head_online" in [s.name for s in engine.speculators]
    finally:
        engine.close()


def test_paused_learner_does_no_work_until_resumed(target):
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(min_new_pairs=4, batch_size=8,
                                                                            max_share=0.5, publish_every=1))
    try:
        spec.pause()
        engine = Engine(target, None, [spec], FixedController(4))
        for i in range(3):
            engine.generate([i + 1, 2], GREEDY)
        spec._wake.set()
        threading.Event().wait(0.5)
        assert spec.updates == 0 and spec.compute_s == 0 and spec._pending  # queued, not learned from
        spec.resume()
        for _ in range(100):
            if spec.updates > 0:
                break
            threading.Event().wait(0.05)
        assert spec.updates > 0
    finally:
        spec.close()


def test_atomic_swap_under_concurrent_drafting(target):
    spec = OnlineHeadSpeculator(random_head(target), DraftConfig(width=2, max_depth=3, min_path_prob=0.0),
                                OnlineConfig(background=False))
    ctx = DecodeContext("r", "default", [1, 2, 3], 2, torch.randn(32))
    versions = [spec.head]
    drafts: list[tuple] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def drafter() -> None:
        try:
            while not stop.is_set():
                d = spec.propose(ctx, 5)
                drafts.append((tuple(d.tokens.tolist()), tuple(d.parents.tolist())))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    th = threading.Thread(target=drafter)
    th.start()
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        with torch.no_grad():
            for p in spec._train.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        spec.publish()
        versions.append(spec.head)
    stop.set()
    th.join()
    assert not errors
    assert len(drafts) > 0
    expected = set()
    for v in versions:
        spec._serving = v
        d = spec.propose(ctx, 5)
        expected.add((tuple(d.tokens.tolist()), tuple(d.parents.tolist())))
    assert len(expected) > 1  # the versions really differ
    assert set(drafts) <= expected  # every draft came from one whole version


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_target_check(target, tmp_path):
    head = random_head(target)
    meta = {"target": {"name": "tiny", "fingerprint": target_fingerprint(target)}}
    save_checkpoint(tmp_path, "h", head, meta)
    assert not list(tmp_path.glob(".*"))  # no temporary files left
    loaded, info = load_checkpoint(tmp_path, "h", target.embed)
    assert torch.equal(loaded.vocab_ids, head.vocab_ids)
    for k, v in head.state_dict().items():
        assert torch.allclose(loaded.state_dict()[k], v.half().float())
    assert info["target"]["name"] == "tiny"
    spec = HeadSpeculator.for_target(target, tmp_path, "h")
    assert spec is not None and spec.head.embed is target.embed
    other = LlamaModel.random(tiny_cfg(), seed=2)
    assert HeadSpeculator.for_target(other, tmp_path, "h") is None
    with pytest.raises(ValueError, match="not this target"):
        HeadSpeculator.for_target(other, tmp_path, "h", required=True)
    assert HeadSpeculator.for_target(target, tmp_path, "missing") is None
    blob = (tmp_path / "h.safetensors").read_bytes()
    (tmp_path / "h.safetensors").write_bytes(blob[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(tmp_path, "h", target.embed)


def test_online_state_round_trip(target, tmp_path):
    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False))
    with torch.no_grad():
        for p in spec._train.parameters():
            p.add_(1.0)
    spec.publish()
    path = tmp_path / "head_online.state"
    spec.save(path)
    fresh = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False))
    assert fresh.load(path)
    for k, v in spec.head.state_dict().items():
        assert torch.equal(fresh.head.state_dict()[k], v)
    assert fresh.version == spec.version
    other = OnlineHeadSpeculator(random_head(target, vocab=32), online=OnlineConfig(background=False))
    assert not other.load(path)  # another draft vocabulary: not loaded
    assert path.exists()  # a valid file of another head is left alone
    assert OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False)).load(
        tmp_path / "missing.state") is False


@pytest.mark.parametrize("damage", ["nan-weight", "wrong-shape", "missing-weight", "negative-counter"])
def test_online_state_of_the_wrong_shape_is_moved_aside(target, tmp_path, damage):
    """A well-formed container whose weights do not fit this head, or are not finite, is never loaded."""
    import warnings

    from adaspec.store import arrays_from_bytes, arrays_to_bytes, load_blob, save_blob

    spec = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False))
    path = tmp_path / "head_online.state"
    spec.save(path)
    payload, meta = load_blob(path)
    arrays = arrays_from_bytes(payload)
    name = sorted(arrays)[0]
    if damage == "nan-weight":
        arrays[name] = np.full_like(arrays[name], np.nan)
    elif damage == "wrong-shape":
        arrays[name] = np.zeros((3,) + arrays[name].shape, dtype=np.float32)
    elif damage == "missing-weight":
        del arrays[name]
    else:
        meta["updates"] = -1
    save_blob(path, arrays_to_bytes(arrays), meta)
    fresh = OnlineHeadSpeculator(random_head(target), online=OnlineConfig(background=False))
    before = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="damaged"):
        assert fresh.load(path) is False
    assert not path.exists() and list(tmp_path.glob("head_online.state.bad-*"))
    assert all(torch.equal(before[k], v) for k, v in fresh.head.state_dict().items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.load(path) is False  # moved aside: nothing left to warn about


# ---------------------------------------------------------------------------------------------
# Draft model
# ---------------------------------------------------------------------------------------------

def test_draft_model_is_lossless_and_rolls_back():
    big, perm = bigram_target()
    wrong = list(perm)
    for x in range(0, 40, 4):  # the draft model disagrees on a quarter of the tokens
        wrong[x] = (perm[x] + 1) % 40
    small, _ = bigram_target(seed=3, perm=wrong)
    spec = DraftModelSpeculator(small, DraftModelConfig(max_depth=4))
    engine = Engine(big, None, [spec], FixedController(4))
    accepted = drafted = 0
    for prompt in ([4, 8, 15], [30, 1]):
        gen = engine.generate(prompt, GREEDY)
        assert gen.tokens == plain(big, prompt)
        accepted, drafted = accepted + gen.stats.accepted, drafted + gen.stats.drafted
    assert 0 < accepted < drafted  # partial acceptance exercised the rollback
    # after a rejected step the draft cache holds exactly the request's tokens: same logits as a fresh prefill
    ctx = DecodeContext("x", "default", [4, 8, 15, 16], 3)
    spec.propose(ctx, 4)
    ctx.tokens[-1:] = [23, 39]  # the target took another path
    logits = spec._sync(ctx)
    fresh = small.prefill(small.new_cache(), ctx.tokens).logits[-1]
    assert torch.allclose(logits, fresh, atol=1e-4)


def test_draft_model_equal_to_target_is_always_accepted(target):
    spec = DraftModelSpeculator(target, DraftModelConfig(max_depth=5))
    gen = Engine(target, None, [spec], FixedController(5)).generate([9, 9, 2], GREEDY)
    assert gen.tokens == plain(target, [9, 9, 2])
    assert gen.stats.drafted > 0 and gen.stats.accepted == gen.stats.drafted


def test_draft_model_sampling_returns_its_distribution(target):
    small = LlamaModel.random(tiny_cfg(layers=1), seed=5)
    spec = DraftModelSpeculator(small, DraftModelConfig(max_depth=3, sample=True), target_vocab_size=70)
    d = spec.propose(DecodeContext("s", "default", [1, 2, 3], 2), 3)
    assert d.dist.shape == (3, 70) and torch.allclose(d.dist.sum(-1), torch.ones(3))
    assert np.allclose(d.probs, d.dist[torch.arange(3), torch.as_tensor(d.tokens)].numpy())
    assert d.dist[:, 64:].sum() == 0
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3)
    gen = Engine(target, None, [DraftModelSpeculator(small, DraftModelConfig(sample=True))],
                 FixedController(3)).generate([5, 6], params)
    assert len(gen.tokens) == 20 and all(0 <= t < 64 for t in gen.tokens)
    with pytest.raises(ValueError):
        DraftModelSpeculator(LlamaModel.random(tiny_cfg(vocab=80), seed=0), target_vocab_size=64)
