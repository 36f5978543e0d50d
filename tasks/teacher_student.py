"""Teacher-student distillation on residual MLP stacks (Liu et al. 2026, §1b of PAPERS.md).

A frozen random teacher (128 residual MLP layers, width 32, vocabulary 128) maps Gaussian inputs
to a distribution softmax(logits / T); the student minimises KL(teacher || student) on fresh
batches. With an independent teacher every teacher layer is different (rough dynamics); with a
tied teacher all layers share one set of weights (a smooth, Euler-discretised ODE).

``head=teacher`` is the authors' exp-9-3 protocol: teacher and student read out through one frozen
Gaussian matrix W ~ N(0, 1/d), and the student's logits are divided by T like the teacher's, so the
student learns only its residual layers. ``objective=mse`` matches rmsnorm(h_L) of student and
teacher instead (no head, no temperature).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F

import archbench
from archbench.blocks.residual import PAPER_1, ResidualMLP
from archbench.knobs import POSITIVE, Range
from archbench.model import FixedReadout, InputSpec, Readout, StreamModel, VectorEmbed
from archbench.task import Task, pure_loss

EVAL_STREAM = 1_000_003  # offset of the held-out generator's seed from the teacher seed


def make_teacher(kind: str, depth: int, dim: int, vocab: int, seed: int, head: str = "learned") -> StreamModel:
    """PyTorch default init, W_proj scaled by 1/sqrt(depth), never trained; reproducible from ``seed``.

    ``head``: ``learned`` (a default-initialised linear head), ``teacher`` (a frozen W ~ N(0, 1/d),
    drawn after the layers, which the students share) or ``none`` (rmsnorm(h_L) itself)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        n_distinct = 1 if kind == "tied" else depth
        layers = [ResidualMLP(dim=dim, layer_idx=l, depth=depth, zero_init=False, proj_scale=depth ** -0.5)
                  for l in range(n_distinct)]
        schedule = [0] * depth if kind == "tied" else None
        if head == "learned":
            readout = Readout(dim, vocab, zero_init=False)
        else:
            readout = FixedReadout(torch.randn(vocab, dim) * dim ** -0.5 if head == "teacher" else None)
        teacher = StreamModel(VectorEmbed(dim, dim), layers, readout, schedule)
    return teacher.requires_grad_(False).eval()


@pure_loss
def kl_loss(logits, targets):  # KL(teacher || student), batch mean; targets are log-probabilities
    logp = F.log_softmax(logits.squeeze(1).float(), dim=-1)
    return (targets.exp() * (targets - logp)).sum(-1).mean()  # F.kl_div has no vmap rule


@pure_loss
def mse_loss(outputs, targets):  # mean squared error over the batch and the d coordinates of rmsnorm(h_L)
    return (outputs.squeeze(1).float() - targets).pow(2).mean()



@archbench.register_task("teacher-student", family="synthetic", citation=PAPER_1)
class TeacherStudent(Task):
    """Distil a random residual-MLP teacher (independent or tied layers) under KL; fresh Gaussian inputs."""

    loss_floor = 0.0
    # Every preset suggests the attention-free relu² branch to transformer-style blocks that offer it,
    # so that they compare with the paper's MLP block on these length-1 "sequences".
    presets = {
        "smoke": {"depths": [3, 6, 12], "seeds": 1, "task": {"teacher_depth": 32, "eval_batches": 2},
                  "block": {"attention": False, "act": "relu2"},
                  "train": {"steps": 150, "batch_size": 256, "lr": 3e-3}},
        # About 10 minutes on a 2-core CPU: a quarter of the paper's batch, a tenth of its steps, its
        # hold-then-decay schedule. Far from converged for the tied teacher (see the README).
        "quick": {"depths": [4, 8, 16], "seeds": 1, "block": {"attention": False, "act": "relu2"},
                  "train": {"steps": 4000, "batch_size": 256, "lr": 3e-3, "schedule": "hold-decay"}},
        # The paper's basic run (the authors' exp-9): learned zero-init head, constant lr, fp32.
        "paper": {"depths": [6, 12, 16, 24, 32, 48], "seeds": 1, "teachers": 3,
                  "block": {"attention": False, "act": "relu2"},
                  "train": {"steps": 40_000, "batch_size": 1024, "lr": 6e-4, "precision": "fp32",
                            "eval_every": 500}},
        # The longer protocol behind "tied teacher -> alpha 3" (exp-9-3): the shared frozen head, student
        # logits over T, lr 6e-4 * 4/sqrt(l) held for 80 % then linearly down to 10 %, 80,000 steps.
        "paper-long": {"depths": [6, 12, 16, 24, 32, 48], "seeds": 1, "teachers": 3,
                       "task": {"teacher": "tied", "head": "teacher"},
                       "block": {"attention": False, "act": "relu2"},
                       "train": {"steps": 80_000, "batch_size": 1024, "lr": 6e-4, "lr_depth_ref": 16,
                                 "schedule": "hold-decay", "hold_frac": 0.8, "final_lr_frac": 0.1,
                                 "precision": "fp32", "eval_every": 500}},
    }
    teacher_knob = "teacher_seed"
    baseline_block = "residual-mlp"  # the paper's student

    def __init__(self, *, device="cpu",
                 teacher: Literal["independent", "tied"] = "independent",
                 # The paper sweeps T over [0.01, 1]; at T = 1 a CPU-sized budget gets closest to convergence.
                 temperature: Annotated[float, Range(0.01, 1.0, log=True), POSITIVE] = 1.0,
                 teacher_depth: Annotated[int, POSITIVE] = 128,
                 dim: int = 32,
                 vocab: Annotated[int, POSITIVE] = 128,
                 teacher_seed: int = 0,
                 eval_batches: Annotated[int, POSITIVE] = 10,
                 # learned: the student's own zero-init head; teacher: the teacher's frozen head (exp-9-3)
                 head: Literal["learned", "teacher"] = "learned",
                 objective: Literal["kl", "mse"] = "kl"):
        super().__init__(device=device)
        if objective == "mse" and (head != "learned" or temperature != 1.0):
            raise archbench.UsageError("task.objective=mse matches rmsnorm(h_L), with no head and no temperature: "
                                       "leave task.head and task.temperature at their defaults")
        self.temperature, self.dim, self.n_eval, self.head, self.objective = temperature, dim, eval_batches, head, objective
        teacher_head = "none" if objective == "mse" else head
        self.teacher = make_teacher(teacher, teacher_depth, dim, vocab, teacher_seed, teacher_head).to(self.device)
        self._teacher = self.teacher  # what draws run: compiled when the engine compiles (compile_draw)
        self.teacher_key = (teacher, teacher_depth, dim, vocab, teacher_seed, teacher_head)
        self.eval_seed = teacher_seed + EVAL_STREAM
        self.input = InputSpec("vector", size=dim, out_dim=dim if objective == "mse" else vocab)
        self.loss = mse_loss if objective == "mse" else kl_loss
        self._eval: dict[int, list] = {}

    def readout(self, width):
        if self.objective == "mse":
            return FixedReadout(None)
        if self.head == "learned":
            return None
        if width != self.dim:
            raise archbench.UsageError(f"task.head=teacher: the student reads out through the teacher's head, so "
                                       f"model.width must be the teacher's width {self.dim}, not {width}")
        # the student's logits are divided by T like the teacher's
        return FixedReadout(self.teacher.readout.weight, scale=1.0 / self.temperature)

    def stream_key(self):  # one teacher forward per step serves every temperature and student
        return ("teacher-student", self.teacher_key)

    @torch.no_grad()
    def draw(self, batch_size, generator):  # inputs and the teacher's logits
        return self.draw_many(batch_size, generator, 1)[0]

    @torch.no_grad()
    def draw_many(self, batch_size, generator, n):  # one teacher forward for n steps' inputs, drawn in order
        xs = [torch.randn(batch_size, self.dim, generator=generator, device=self.device) for _ in range(n)]
        return list(zip(xs, self._teacher(torch.cat(xs)).squeeze(1).float().split(batch_size)))

    def compile_draw(self):
        self._teacher = torch.compile(self.teacher)

    def targets(self, x, teacher_out):  # teacher log-probabilities at temperature T (B, vocab); mse: rmsnorm(h_L)
        return teacher_out if self.objective == "mse" else F.log_softmax(teacher_out / self.temperature, dim=-1)

    def batch(self, batch_size, generator):
        x, teacher_logits = self.draw(batch_size, generator)
        return x, self.targets(x, teacher_logits)

    def metrics(self, logits, targets):
        if self.objective == "mse":
            return {}
        agree = logits.squeeze(1).argmax(-1) == targets.argmax(-1)
        return {"top1_agreement": agree.float().mean().item()}

    def eval_batches(self, batch_size):
        if batch_size not in self._eval:  # 10 fresh batches, the same for every run on this teacher
            g = torch.Generator(device=self.device).manual_seed(self.eval_seed)
            self._eval[batch_size] = [self.batch(batch_size, g) for _ in range(self.n_eval)]
        return self._eval[batch_size]
