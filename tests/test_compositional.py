"""The compositional tasks: shapes, determinism, held-out separation and hand-worked labels."""

import math
import re

import pytest
import torch

from archbench.errors import UsageError
from archbench.registry import TASKS
from archbench.task import IGNORE, SequenceTask, fingerprint
from archbench.tasks.cfg_language import Grammar, generate
from archbench.tasks.word_problem import abelianization, compose, derived_series, group_elements, solvable

SMALL = {
    "k-hop": {"k": 3, "pairs": 6, "alphabet": 10, "eval_size": 128},
    "word-problem": {"group": "S5", "seq_len": 6, "eval_size": 128},
    "variable-binding": {"hops": 3, "distractors": 2, "names": 12, "eval_size": 128},
    "modular-chain": {"n": 3, "p": 11, "eval_size": 128},
    "cfg-language": {"nesting": 3, "seq_len": 24, "eval_size": 128},
    "hop-induction": {"seq_len": 16, "max_hops": 3, "eval_per_k": 32},  # 4 hop counts x 32 = 128 held out
}


def make(name, **kw):
    return TASKS.get(name).obj(device="cpu", **{**SMALL[name], **kw})


def test_every_sequence_task_is_tested_here():
    seq_tasks = {e.name for e in TASKS.entries() if isinstance(e.obj, type) and issubclass(e.obj, SequenceTask)}
    assert seq_tasks == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_dtypes_and_label_ranges(name):
    task = make(name)
    x, y = task.batch(32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (32, task.input.seq_len)
    assert x.dtype == y.dtype == torch.long
    assert 0 <= x.min() and x.max() < task.input.size
    labelled = y[y != IGNORE]
    assert labelled.numel() > 0 and 0 <= labelled.min() and labelled.max() < task.input.out_dim
    # a model that outputs uniform logits has loss log(out_dim)
    uniform = torch.zeros(32, task.input.seq_len, task.input.out_dim)
    assert task.loss(uniform, y).item() == pytest.approx(math.log(task.input.out_dim), rel=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_determinism_and_fixed_heldout_set(name):
    a, b = make(name), make(name)
    xa, ya = a.batch(16, torch.Generator().manual_seed(3))
    xb, yb = b.batch(16, torch.Generator().manual_seed(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, a.batch(16, torch.Generator().manual_seed(4))[0])
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a.eval_batches(50), b.eval_batches(50)))
    assert sum(len(x) for x, _ in a.eval_batches(50)) == 128
    other = make(name, data_seed=1)  # another data seed, another held-out set
    assert not torch.equal(other.heldout[0], a.heldout[0])


@pytest.mark.parametrize("name", sorted(set(SMALL) - {"cfg-language"}))  # a language: held-out windows are iid draws
def test_heldout_problems_never_appear_in_training_batches(name):
    task = make(name)
    held = set(fingerprint(task.heldout[0]).tolist())
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert not held & set(fingerprint(task.batch(256, g)[0]).tolist())


def test_small_problem_space_redraws_heldout_problems_and_refuses_too_large_heldout():
    task = TASKS.get("modular-chain").obj(device="cpu", n=2, p=11, eval_size=30)  # 121 problems
    held = {tuple(r) for r in task.heldout[0].tolist()}
    seen = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        seen |= {tuple(r) for r in task.batch(64, g)[0].tolist()}
    assert not seen & held and len(seen) + len(held) > 100  # the rest of the space is still drawn
    with pytest.raises(UsageError, match="only 121 distinct problems"):
        TASKS.get("modular-chain").obj(device="cpu", n=2, p=11, eval_size=100)


# --- hop-induction ---------------------------------------------------------------------------

def hop_reference(string, k):
    """Sanford et al.'s hop_k at every position, by the definition: follow "the character after the previous
    occurrence of the current one" k times; None where a step finds no earlier occurrence."""
    out = []
    for i in range(len(string)):
        pos = i
        for _ in range(k):
            earlier = [j for j in range(pos) if string[j] == string[pos]]
            if not earlier:
                pos = None
                break
            pos = earlier[-1] + 1
        out.append(None if pos is None else string[pos])
    return out


def test_hop_induction_hand_worked_string():
    from archbench.tasks.hop_induction import hop_targets

    s = [0, 1, 0, 2, 1, 0, 1, 2]  # 3 characters; 3 is "does not exist"
    hop = lambda k: hop_targets(torch.tensor([s]), torch.tensor([k]), 3, 3)[0].tolist()  # noqa: E731
    assert hop(0) == s
    assert hop(1) == [3, 3, 1, 3, 0, 2, 0, 1]  # e.g. position 6 (a 1): the previous 1 is at 4, then 0 follows
    assert hop(2) == [3, 3, 3, 3, 1, 3, 2, 0]
    assert hop(3) == [3, 3, 3, 3, 3, 3, 3, 1]


def test_hop_induction_labels_match_the_definition_and_the_held_out_set_has_every_k():
    task = make("hop-induction", seq_len=40, max_hops=6, eval_per_k=8)
    x, y = task.batch(200, torch.Generator().manual_seed(0))
    assert (y[:, 0] == IGNORE).all()
    ks = x[:, 0] - task.HOP
    assert set(ks.tolist()) == set(range(7))  # k uniform over 0..max_hops
    for row, labels, k in zip(x[:, 1:].tolist(), y[:, 1:].tolist(), ks.tolist()):
        assert all(a != b for a, b in zip(row, row[1:]))  # no character twice in a row
        assert labels == [task.chars if h is None else h for h in hop_reference(row, k)]
    assert (task.heldout[0][:, 0] - task.HOP).tolist() == task.eval_k.tolist() == sorted(list(range(7)) * 8)


def test_hop_induction_scores_each_k_on_the_held_out_set():
    """A model that answers every position with its own character is right at k = 0 only."""
    task = make("hop-induction", seq_len=30, max_hops=4, eval_per_k=16)

    class Copy(torch.nn.Module):
        def forward(self, x):  # logits: the current character (the hop-count token gets "does not exist")
            return torch.nn.functional.one_hot(x.clamp(max=task.chars), task.input.out_dim).float() * 10

    out = task.evaluate(Copy(), 20)
    assert out["error_k0"] == 0.0 and all(out[f"error_k{k}"] > 0.3 for k in range(1, 5))
    wrong = sum(out[f"error_k{k}"] for k in range(5)) / 5  # every k has the same number of positions
    assert out["accuracy"] == pytest.approx(1 - wrong)


# --- k-hop -----------------------------------------------------------------------------------

def decode_pairs(context, alphabet, pairs, encoding):
    if encoding == "tokens":
        return list(zip(context[0::2], context[1::2]))
    return [divmod(t - alphabet - pairs, alphabet) for t in context]


def follow(x, alphabet, pairs, encoding="tokens"):
    """Reference: decode the context pairs and the ``<hop k> q`` tail, and follow q for k hops."""
    *context, hop, q = x
    f = dict(decode_pairs(context, alphabet, pairs, encoding))
    for _ in range(hop - alphabet + 1):
        q = f[q]
    return q


def test_k_hop_hand_worked_three_hop_chain():
    # 5 -> 2 -> 7 -> 1 among distractors 3 -> 5 and 4 -> 4; alphabet 8, 5 pairs, hop token for k = 3 is 8 + 2
    x = [3, 5, 7, 1, 2, 7, 4, 4, 5, 2, 10, 5]
    assert follow(x, alphabet=8, pairs=5) == 1
    assert follow(x[:-2] + [8, 5], alphabet=8, pairs=5) == 2  # k = 1: a single lookup
    # the same context as pair tokens: 8 + 5 + key·8 + value
    pair_x = [13 + a * 8 + b for a, b in zip(x[0:10:2], x[1:10:2])] + [10, 5]
    assert follow(pair_x, alphabet=8, pairs=5, encoding="pair") == 1


@pytest.mark.parametrize("encoding", ["pair", "tokens"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_k_hop_labels_follow_the_chain(k, encoding):
    task = make("k-hop", k=k, encoding=encoding)
    x, y = task.batch(300, torch.Generator().manual_seed(k))
    assert (y[:, :-1] == IGNORE).all()
    for row, label in zip(x.tolist(), y[:, -1].tolist()):
        pairs = decode_pairs(row[:-2], task.alphabet, task.pairs, encoding)
        keys = [a for a, _ in pairs]
        assert len(set(keys)) == len(keys) == task.pairs
        assert row[-2] == task.alphabet + k - 1
        assert follow(row, task.alphabet, task.pairs, encoding) == label
        # the chain visits k + 1 distinct symbols: no cycle shortens it
        f, q, seen = dict(pairs), row[-1], [row[-1]]
        for _ in range(k):
            q = f[q]
            seen.append(q)
        assert len(set(seen)) == k + 1


def test_k_hop_curriculum_grows_hops_and_heldout_stays_at_k():
    task = make("k-hop", k=4, curriculum="grow", curriculum_frac=0.5)
    hops = lambda: set((task.batch(200, torch.Generator().manual_seed(0))[0][:, -2] - task.alphabet + 1).tolist())
    task.set_progress(0.0)
    assert hops() == {1}
    task.set_progress(0.3)
    assert hops() == {1, 2, 3}
    task.set_progress(0.9)
    assert hops() == {1, 2, 3, 4}
    assert set((task.heldout[0][:, -2] - task.alphabet + 1).tolist()) == {4}


def test_k_hop_rejects_impossible_settings():
    with pytest.raises(UsageError, match="needs 1 <= k <= pairs"):
        make("k-hop", k=7)
    with pytest.raises(UsageError, match="fewer pairs than alphabet"):
        make("k-hop", pairs=10)


# --- word problem ----------------------------------------------------------------------------

def test_s5_product_of_three_known_permutations():
    a, b, c = (1, 0, 2, 3, 4), (1, 2, 3, 4, 0), (0, 3, 2, 1, 4)  # (0 1), (0 1 2 3 4), (1 3)
    # a first: 0 -a-> 1 -b-> 2 -c-> 2;  1 -> 0 -> 1 -> 3;  2 -> 2 -> 3 -> 1;  3 -> 3 -> 4 -> 4;  4 -> 4 -> 0 -> 0
    assert compose(compose(a, b), c) == (2, 3, 1, 4, 0)
    task = make("word-problem")
    idx = {g: i for i, g in enumerate(task.elements)}
    x = torch.tensor([[idx[a], idx[b], idx[c]]])
    got = [task.elements[i] for i in task.running_product(x)[0].tolist()]
    assert got == [a, (2, 1, 3, 4, 0), (2, 3, 1, 4, 0)]


@pytest.mark.parametrize("name, order, is_solvable", [
    ("S5", 120, False), ("A5", 60, False), ("A4xZ5", 60, True), ("Z60", 60, True), ("S4", 24, True),
    ("D4", 8, True), ("Z2xZ2", 4, True)])
def test_group_orders_and_solvability(name, order, is_solvable):
    elements = group_elements(name)
    assert len(elements) == order and elements[0] == tuple(range(len(elements[0])))
    assert solvable(elements) is is_solvable


def test_derived_series_and_the_abelian_quotient():
    """A4xZ5 ⊃ V4 ⊃ 1, so G/[G,G] = Z3×Z5 has 15 classes of 4; A5 is perfect (no abelian quotient)."""
    assert [len(d) for d in derived_series(group_elements("A4xZ5"))] == [60, 4, 1]
    assert [len(d) for d in derived_series(group_elements("S4"))] == [24, 12, 4, 1]
    assert [len(d) for d in derived_series(group_elements("A5"))] == [60]
    assert abelianization(group_elements("A5")) is None
    elements = group_elements("A4xZ5")
    coset = abelianization(elements)
    assert sorted(torch.bincount(coset).tolist()) == [4] * 15
    index = {g: i for i, g in enumerate(elements)}
    a, b = elements[7], elements[23]  # the quotient is abelian: ab and ba fall in one class
    assert coset[index[compose(a, b)]] == coset[index[compose(b, a)]]
    # a prediction off by a commutator is wrong but in the right class
    task = make("word-problem", group="A4xZ5", seq_len=4, eval_size=64)
    x, y = task.batch(64, torch.Generator().manual_seed(0))
    commutator = derived_series(elements)[1][1]
    off = torch.tensor([[index[compose(elements[t], commutator)] for t in row] for row in y.tolist()])
    m = task.metrics(torch.nn.functional.one_hot(off, 60).float(), y)
    assert m["accuracy"] == 0 and m["abelian_accuracy_by_position"] == [1.0] * 4
    assert "abelian_accuracy_by_position" not in make("word-problem", group="A5", seq_len=4, eval_size=64).metrics(
        torch.nn.functional.one_hot(y, 60).float(), y)


def test_word_problem_labels_are_running_products_and_bad_group_names_are_refused():
    task = make("word-problem", group="A4xZ5")
    x, y = task.batch(50, torch.Generator().manual_seed(0))
    for row, labels in zip(x.tolist(), y.tolist()):
        p = task.elements[row[0]]
        for t, g in enumerate(row):
            if t:
                p = compose(p, task.elements[g])
            assert task.elements[labels[t]] == p
    with pytest.raises(UsageError, match="not a group name"):
        make("word-problem", group="S5x")


# --- variable binding ------------------------------------------------------------------------

def resolve_program(tokens, names):
    """Reference: execute ``x = y ;`` statements in order and answer the final ``x ?``."""
    env = {}
    *body, query, _ = tokens
    for lhs, _, rhs, _ in zip(*[iter(body)] * 4):
        env[lhs] = rhs if rhs >= names else env[rhs]
    return env[query]


def test_variable_binding_hand_worked_and_generated_programs():
    names = 12  # values are tokens 12..21, "=" 22, ";" 23, "?" 24
    # a = 3 ; x = 5 ; b = a ; c = b ; c ?   ->  3
    a, b, c, x = 0, 1, 2, 3
    prog = [a, 22, 15, 23, x, 22, 17, 23, b, 22, a, 23, c, 22, b, 23, c, 24]
    assert resolve_program(prog, names) == 15
    task = make("variable-binding")
    xs, ys = task.batch(300, torch.Generator().manual_seed(0))
    for row, label in zip(xs.tolist(), ys[:, -1].tolist()):
        lhs = row[:-2][0::4]
        assert len(set(lhs)) == len(lhs) == 3 * 3  # every variable assigned once
        assert resolve_program(row, names) == label


# --- modular chain ---------------------------------------------------------------------------

def test_modular_chain_labels():
    task = make("modular-chain", n=3, p=7, eval_size=10)
    # tokens: operands 0..6, "+" 7, "=" 8;  3 + 5 + 6 = 14 = 0 (mod 7)
    assert task.OP == 7 and task.EQ == 8
    x, y = task.batch(200, torch.Generator().manual_seed(0))
    assert (x[:, 1::2][:, :-1] == 7).all() and (x[:, -1] == 8).all()
    assert torch.equal(y[:, -1], x[:, 0::2].sum(-1) % 7)
    prod = make("modular-chain", n=3, p=7, op="product", eval_size=10)
    x, y = prod.batch(200, torch.Generator().manual_seed(0))
    assert (x[:, 0::2] > 0).all()
    assert torch.equal(y[:, -1], x[:, 0::2].prod(-1) % 7)


# --- cfg language ----------------------------------------------------------------------------

def test_tiny_grammar_entropy_rate_matches_its_closed_form_and_samples():
    p = 0.4
    g = Grammar.from_strings({"S": [(p, "aSb"), (1 - p, "c")]}, terminals="abc")
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    # H(S) = h + p·H(S);  E[len] = p·(2 + E[len]) + (1 - p)
    assert g.sentence_entropy == pytest.approx(h / (1 - p))
    assert g.sentence_length == pytest.approx((1 + p) / (1 - p))
    assert g.entropy_rate == pytest.approx(h / (1 - p) / ((1 + p) / (1 - p) + 1))
    seq, ent = generate(g, g.tables("cpu"), 400, 257, torch.Generator().manual_seed(0))
    text = "".join("abc|"[t] for t in seq.flatten().tolist())
    for sentence in re.split(r"\|", "".join("abc|"[t] for t in seq[0].tolist()))[1:-1]:
        n = sentence.count("a")
        assert sentence == "a" * n + "c" + "b" * n
    assert set(text) == set("abc|")
    # the conditional entropy of a token is that of the choice it reveals: a and c carry h, b and | carry 0
    assert torch.allclose(ent[(seq == 0) | (seq == 2)], torch.tensor(h))
    assert (ent[(seq == 1) | (seq == 3)] == 0).all()
    assert ent[:, 1:].mean().item() == pytest.approx(g.entropy_rate, rel=0.03)


def test_grammars_must_be_deterministic_and_consistent():
    with pytest.raises(ValueError, match="start with its own terminal"):
        Grammar.from_strings({"S": [(0.5, "aS"), (0.5, "ab")]}, terminals="ab")
    with pytest.raises(ValueError, match="start with its own terminal"):
        Grammar.from_strings({"S": [(0.5, "Ta"), (0.5, "b")], "T": [(1.0, "a")]}, terminals="ab")
    with pytest.raises(ValueError, match="infinite"):
        Grammar.from_strings({"S": [(0.5, "aSS"), (0.5, "b")]}, terminals="ab")


class Uniform(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x):
        return torch.zeros(*x.shape, self.n)


def test_cfg_language_reports_cross_entropy_beside_the_grammar_entropy():
    task = make("cfg-language")
    assert 0 < task.grammar.entropy_rate < math.log(task.input.out_dim)
    assert task.loss_floor == pytest.approx(task.heldout_entropy.mean().item())
    assert task.loss_floor == pytest.approx(task.grammar.entropy_rate, rel=0.25)
    out = task.evaluate(Uniform(task.input.out_dim), 64)
    assert out["loss"] == pytest.approx(math.log(task.input.out_dim), rel=1e-5)
    assert out["excess_ce"] == pytest.approx(out["loss"] - out["optimal_ce"])
    assert out["entropy_rate"] == task.grammar.entropy_rate
    assert task.solved(out) is False and task.solved({**out, "excess_ce": 0.01}) is True


# --- the controls are learnable --------------------------------------------------------------

def train_until_solved(task, depth, width, lr, batch_size, max_steps, weight_decay=0.0):
    """Train a small residual transformer on ``task``; held-out metrics every 100 steps, stop when solved."""
    from archbench.model import build_model
    from archbench.registry import BLOCKS

    torch.manual_seed(0)
    model = build_model(BLOCKS.get("residual").obj, {}, depth, task.input, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(0)
    for step in range(1, max_steps + 1):
        x, y = task.batch(batch_size, g)
        loss = task.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            metrics = task.evaluate(model, 256)
            if task.solved(metrics):
                break
    return metrics, step


@pytest.mark.parametrize("name, knobs, depth, width, lr, batch", [
    ("k-hop", {"k": 1, "pairs": 8, "alphabet": 16}, 1, 64, 1e-3, 128),  # one lookup: one layer
    ("word-problem", {"group": "Z2xZ2", "seq_len": 4, "eval_size": 32}, 2, 32, 3e-3, 64),
    ("cfg-language", {"nesting": 1, "seq_len": 16, "eval_size": 256}, 2, 32, 3e-3, 64),
])
def test_controls_are_solved_by_a_shallow_model_in_a_short_run(name, knobs, depth, width, lr, batch):
    torch.set_num_threads(2)
    task = TASKS.get(name).obj(device="cpu", **knobs)
    metrics, steps = train_until_solved(task, depth, width, lr, batch, max_steps=1000)
    assert task.solved(metrics), (steps, metrics)


@pytest.mark.parametrize("name, knobs, chance, floor", [
    # modular addition generalises to held-out pairs only after grokking (thousands of steps),
    # so a short run checks that the shallow model learns far beyond chance
    ("modular-chain", {"n": 2, "p": 23, "eval_size": 50}, 1 / 23, 0.3),
])
def test_slow_controls_learn_well_beyond_chance_in_a_short_run(name, knobs, chance, floor):
    torch.set_num_threads(2)
    task = TASKS.get(name).obj(device="cpu", **knobs)
    metrics, _ = train_until_solved(task, 2, 64, 1e-3, 128, max_steps=500, weight_decay=1.0)
    assert metrics["accuracy"] > max(floor, 5 * chance), metrics
