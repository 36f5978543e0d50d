import pytest
import torch
import torch.nn.functional as F

from archbench.errors import ArchbenchError
from archbench.model import build_model
from archbench.registry import BLOCKS, TASKS
from archbench.tasks.teacher_student import TeacherStudent, make_teacher


def small_teacher_task(**kw):
    return TeacherStudent(device="cpu", **{"teacher_depth": 8, "eval_batches": 2, **kw})


def test_tied_teacher_shares_weights_and_independent_does_not():
    tied = make_teacher("tied", depth=6, dim=8, vocab=5, seed=0)
    indep = make_teacher("independent", depth=6, dim=8, vocab=5, seed=0)
    layers = tied.effective_layers()
    assert len(layers) == 6 and all(l is layers[0] for l in layers)
    w = [l.mlp.fc1.weight for l in indep.effective_layers()]
    assert len({id(x) for x in w}) == 6 and not torch.equal(w[0], w[1])
    # Default init with W_proj scaled by 1/sqrt(depth): the paper's teacher.
    bound = (4 * 8) ** -0.5 * 6 ** -0.5  # kaiming-uniform bound 1/sqrt(fan_in), then the scale
    assert indep.layers[0].mlp.fc2.weight.abs().max() <= bound + 1e-7
    assert indep.layers[0].mlp.fc2.weight.abs().max() > 0.5 * bound


def test_teacher_is_reproducible_from_its_seed():
    a, b, c = (make_teacher("independent", 4, 8, 5, s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_student_targets_loss_and_heldout_set():
    task = small_teacher_task(temperature=0.5)
    g = torch.Generator().manual_seed(0)
    x, logp = task.batch(16, g)
    assert x.shape == (16, 32) and logp.shape == (16, 128) and x.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(-1), torch.ones(16), atol=1e-5)
    # The target is the teacher's distribution at temperature T ...
    assert torch.allclose(logp, F.log_softmax(task.teacher(x).squeeze(1) / 0.5, -1), atol=1e-6)
    # ... so a student that outputs teacher logits / T has zero loss, and uniform has KL = log V - H.
    assert task.loss((task.teacher(x) / 0.5), logp).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(16, 1, 128)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    assert task.loss(uniform, logp).item() == pytest.approx((torch.log(torch.tensor(128.0)) - entropy).item(), rel=1e-5)
    # Fresh batches differ; the held-out set is fixed and the same for a new task object.
    assert not torch.equal(task.batch(16, g)[0], x)
    e1, e2 = task.eval_batches(16), small_teacher_task(temperature=0.5).eval_batches(16)
    assert len(e1) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(e1, e2))


def test_shared_frozen_head_is_the_teachers_and_the_students_logits_are_over_t():
    """exp-9-3: teacher and student read out through one W ~ N(0, 1/d), a buffer, and the student's
    logits are divided by T like the teacher's, so a student that copies the teacher has zero loss."""
    task = small_teacher_task(head="teacher", teacher="tied", temperature=0.25, vocab=2048)
    w = task.teacher.readout.weight
    assert not w.requires_grad and w.shape == (2048, 32)
    assert w.std().item() == pytest.approx(32 ** -0.5, rel=0.02) and abs(w.mean().item()) < 0.01
    student = build_model(BLOCKS.get("residual-mlp").obj, {"act": "relu2"}, 8, task.input, 32,
                          readout=task.readout(32))
    assert torch.equal(student.readout.weight, w) and "readout.weight" in student.state_dict()
    assert all("readout" not in n for n, _ in student.named_parameters())  # the student learns its layers only
    x, logp = task.batch(16, torch.Generator().manual_seed(0))
    h = torch.nn.functional.rms_norm(torch.randn(16, 1, 32), (32,))
    assert torch.allclose(student.readout(h), h @ w.T / 0.25, atol=1e-5)
    assert torch.allclose(task.teacher.readout(h), h @ w.T, atol=1e-5)
    assert task.loss(task.teacher(x) / 0.25, logp).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ArchbenchError, match="model.width must be the teacher's width 32"):
        task.readout(64)
    # the default protocol is unchanged: a learned head, and the teacher's own default-initialised one
    assert small_teacher_task().readout(32) is None


def test_mse_objective_matches_the_normalised_final_states():
    task = small_teacher_task(objective="mse")
    x, target = task.batch(16, torch.Generator().manual_seed(0))
    assert task.input.out_dim == 32 and target.shape == (16, 32)
    assert torch.allclose(target.pow(2).mean(-1), torch.ones(16), atol=1e-4)  # rmsnorm(h_L) of the teacher
    out = torch.randn(16, 1, 32)
    assert task.loss(out, target).item() == pytest.approx(((out.squeeze(1) - target) ** 2).mean().item())
    assert task.readout(32)(2 * out).allclose(torch.nn.functional.rms_norm(out, (32,)), atol=1e-5)
    for bad in ({"head": "teacher"}, {"temperature": 0.5}):
        with pytest.raises(ArchbenchError, match="objective=mse"):
            small_teacher_task(objective="mse", **bad)


def test_lm_char_batches_are_shifted_windows():
    task = TASKS.get("lm-char").obj(device="cpu", seq_len=16, eval_batches=2)
    x, y = task.batch(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = "".join(task.chars[i] for i in x[0].tolist())
    assert text.isprintable() or "\n" in text
    # Held-out windows come from the tail of the text, never the training part.
    ev = task.eval_batches(4)
    assert len(ev) == 2 and ev[0][0].shape == (4, 16)
    assert task.loss(torch.zeros(4, 16, len(task.chars)), y).item() == pytest.approx(
        torch.log(torch.tensor(float(len(task.chars)))).item(), rel=1e-5)


def test_lm_char_user_text_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("abcab" * 100)
    task = TASKS.get("lm-char").obj(device="cpu", seq_len=8, text_file=str(f))
    assert task.chars == ["a", "b", "c"] and task.input.size == 3
    with pytest.raises(ArchbenchError, match="does not exist"):
        TASKS.get("lm-char").obj(device="cpu", text_file=str(tmp_path / "nope.txt"))
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(ArchbenchError, match="needs at least"):
        TASKS.get("lm-char").obj(device="cpu", seq_len=8, text_file=str(tmp_path / "tiny.txt"))


def test_lm_word_vocabulary_comes_from_the_training_text(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("The cat sat. The dog sat!\n" * 40 + "Zebra ZEBRA quokka.\n" * 5)
    task = TASKS.get("lm-word").obj(device="cpu", seq_len=8, text_file=str(f), vocab_size=3)
    # the two most frequent lower-cased words of the first 90 % ("the" and "sat", 79 times each: ties
    # alphabetical), <unk> for the rest
    assert task.vocab == ["<unk>", "sat", "the"]
    x, y = task.batch(4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert (task.val_data == 0).any() and (task.val_data == 2).any()  # "zebra" is <unk>, "the" is known
    assert "bits_per_word" in task.metrics(torch.zeros(4, 8, 3), y)
