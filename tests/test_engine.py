"""The engine loop is lossless: scripted drafts of every kind give plain greedy output (tiny random target)."""

import pytest
import torch

from adaspec.control.base import FixedController
from adaspec.engine import Engine, stable_text
from adaspec.model.llama import LlamaConfig, LlamaModel
from adaspec.speculators.oracle import OracleSpeculator
from adaspec.verify import SamplingParams

from lossless import ScriptedSpeculator, assert_greedy_equivalent

CFG = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_context=512)
PROMPTS = [[(7 * i + 3 * j) % 97 for j in range(5 + i)] for i in range(6)]
MODES = ["all", "none", ("mismatch", 1), ("mismatch", 2), ("mismatch", 3), "tree"]


@pytest.fixture(scope="module")
def model():
    m = LlamaModel.random(CFG, seed=1)
    with torch.no_grad():
        m.embed.mul_(0.2)  # tied head: smaller embeddings give flatter next-token distributions to sample from
    return m


@pytest.fixture(scope="module")
def plain(model):
    eng = Engine(model)
    return {tuple(p): eng.generate(p, SamplingParams(max_tokens=24)).tokens for p in PROMPTS}


@pytest.mark.parametrize("mode", MODES, ids=str)
def test_scripted_drafts_give_plain_greedy_output(model, plain, mode):
    eng = Engine(model, speculators=[ScriptedSpeculator(plain, mode, CFG.vocab_size)], controller=FixedController(4))
    for p in PROMPTS:
        g = eng.generate(p, SamplingParams(max_tokens=24))
        assert_greedy_equivalent(model, p, plain[tuple(p)], g.tokens)
        st = g.stats
        assert st.output_tokens == 24 and st.forwards == pytest.approx(24 / st.mean_accepted)
        if mode == "all":
            assert st.accepted == st.drafted > 0 and st.mean_accepted > 3
        if mode == "none":
            assert st.accepted == 0 and st.forwards == 24
        if isinstance(mode, tuple):
            # every draft that had m + 1 tokens left accepts exactly m of them
            assert st.accepted_per_pos[mode[1]] == 0 and st.accepted_per_pos[mode[1] - 1] > 0


def test_oracle_reaches_the_lookahead_ceiling(model, plain):
    oracle = OracleSpeculator()
    for p in PROMPTS:
        oracle.add(p, plain[tuple(p)])
    eng = Engine(model, speculators=[oracle], controller=FixedController(5))
    g = eng.generate(PROMPTS[0], SamplingParams(max_tokens=24))
    assert g.tokens == plain[tuple(PROMPTS[0])]
    assert g.stats.acceptance_rate == 1.0 and g.stats.forwards == 5  # prefill + 4 steps of 6 tokens (5 + bonus)


def test_plain_engine_counts_one_token_per_forward(model):
    g = Engine(model).generate(PROMPTS[1], SamplingParams(max_tokens=10))
    assert g.stats.mean_accepted == 1.0 and g.stats.drafted == 0 and g.finish_reason == "length"


@pytest.mark.parametrize("mode", ["all", "none", ("mismatch", 2), "tree"], ids=str)
def test_seeded_sampling_equals_plain_sampling_with_the_same_seed(model, plain, mode):
    params = dict(max_tokens=20, temperature=1.0, top_p=0.95)
    base = Engine(model)
    eng = Engine(model, speculators=[ScriptedSpeculator(plain, mode, CFG.vocab_size)], controller=FixedController(4))
    for p in PROMPTS[:3]:
        a = base.generate(p, SamplingParams(seed=11, **params)).tokens
        b = eng.generate(p, SamplingParams(seed=11, **params)).tokens
        c = base.generate(p, SamplingParams(seed=12, **params)).tokens
        assert a == b  # the seed fixes the output whatever the drafts were
        assert a != c or p != PROMPTS[0]


def test_seeded_speculative_sampling_follows_the_target_distribution():
    """Gumbel-coupled verification samples each position from the target distribution."""
    from adaspec.speculators.base import Draft
    from adaspec.verify import verify, target_probs

    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.3, 0.3, 0.3, 0.3, 0.3]])
    params = SamplingParams(temperature=1.0, seed=0)
    p = target_probs(logits[:1], params)[0]
    counts = torch.zeros(5, dtype=torch.float64)
    n = 3000
    for s in range(n):
        v = verify(logits, Draft.chain([3]), SamplingParams(temperature=1.0, seed=s))
        counts[v.emitted[0]] += 1
    assert 0.5 * float((counts / n - p).abs().sum()) < 0.04


class _CharTokenizer:
    """ids are characters 'a' + i; id 0 is EOS."""

    eos_token_ids = {0}

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_eos(model, plain):
    eng = Engine(model, _CharTokenizer())
    p = PROMPTS[3]
    full = eng.generate(p, SamplingParams(max_tokens=24, ignore_eos=True))
    stop = full.text[5:7]
    g = eng.generate(p, SamplingParams(max_tokens=24, stop=(stop,), ignore_eos=True))
    assert g.finish_reason == "stop" and g.text == full.text[: full.text.find(stop)]

    class Eos(_CharTokenizer):
        eos_token_ids = {full.tokens[4]}

    g = Engine(model, Eos()).generate(p, SamplingParams(max_tokens=24))
    assert g.finish_reason == "stop" and g.tokens == full.tokens[: full.tokens.index(full.tokens[4])]


def test_stable_text_holds_back_partial_stop_strings(model):
    eng = Engine(model, _CharTokenizer())
    req = eng.start(PROMPTS[0], SamplingParams(max_tokens=24, stop=("zzzq",), ignore_eos=True))
    req.text = "hello zz"
    assert stable_text(req) == "hello "
    req.text = "hello y\ufffd"  # an unfinished multi-byte character is held back too
    assert stable_text(req) == "hello y"
    eng.finish(req, cancelled=True)
    assert req.finish_reason == "cancelled"


class _Utf8Tokenizer:
    """Token ids are bytes: some lead and continuation bytes of two-byte characters, the rest ASCII letters, so
    random outputs hold whole, unfinished and invalid characters (``whole=True``: whole characters only).
    Records how many ids each decode sees."""

    eos_token_ids = set()

    def __init__(self, whole: bool = False):
        self.table = {2: "é".encode()} if whole else {0: b"\xc3", 1: b"\xa9", 2: "é".encode()}
        self.decoded = []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return b"".join(self.table.get(i % 8, bytes([ord("a") + i % 26])) for i in ids).decode(errors="replace")


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("whole", [False, True])
def test_text_is_decoded_incrementally_and_equals_the_whole_decode(model, plain, speculate, whole):
    tok = _Utf8Tokenizer(whole)
    specs = [ScriptedSpeculator(plain, "all", CFG.vocab_size)] if speculate else []
    eng = Engine(model, tok, speculators=specs, controller=FixedController(4))
    for p in PROMPTS:
        tok.decoded.clear()
        req = eng.start(p, SamplingParams(max_tokens=200, ignore_eos=True))
        while True:
            assert req.text == _Utf8Tokenizer(whole).decode(req.output)
            shown = stable_text(req)
            assert req.text.startswith(shown)
            if req.finished:
                break
            assert not shown.endswith("\ufffd")
            eng.step(req)
        eng.finish(req)
        if whole:  # each decode sees the last two steps' tokens at most, never the whole output
            assert max(tok.decoded) <= 10
        full = req.text
        for stop in (full[40:42], full[77:80], full[-2:]):  # stop strings that span steps
            g = eng.generate(p, SamplingParams(max_tokens=200, stop=(stop, "never there"), ignore_eos=True))
            assert g.finish_reason == "stop" and g.text == full[: full.find(stop)]


def test_bad_prompts_are_rejected(model):
    eng = Engine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.start([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        eng.start([1, 2, 500], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.start([1] * CFG.max_context, SamplingParams())


def test_generation_stops_at_the_context_limit(model):
    g = Engine(model).generate([1] * (CFG.max_context - 5), SamplingParams(max_tokens=100))
    assert g.finish_reason == "length" and len(g.tokens) <= 5
