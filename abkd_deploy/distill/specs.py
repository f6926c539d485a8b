"""What a ``distill``/``compare`` run is made of: teacher, student and KD specs.

Torch-free dataclasses: each field that the command line exposes declares its option in
its metadata (``cli``: the option string, ``help``; ``choices``, ``path``, ``bounds``
(of a float) where they apply), and ``abkd_deploy/cli.py`` derives the click options and
builds these objects from that declaration. A KD option that a loss term reads also
names the term and its keyword (``term``, ``option``) and :meth:`KDSpec.term_options`
routes it; one that
:meth:`~abkd_deploy.distill.objective.Objective.from_method` reads says ``objective``.
Adding a KD option is therefore one field of :class:`KDSpec` (plus the code that uses it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch: only where an objective is built
    from abkd_deploy.distill.losses import LayerDims
    from abkd_deploy.distill.objective import Objective


#: ``abkd``'s attention rules (``losses.abkd.ATTENTION_CHOICES``, which a test keeps equal;
#: spelled out here so that building the CLI does not import torch).
ABKD_ATTENTIONS = ("learned", "uniform", "align", "entropy", "prior")


def cli_field(default: Any, cli: str, help: str | None = None, **meta: Any) -> Any:
    """A dataclass field declaring its command-line option (see the module docstring)."""
    return field(default=default, metadata={"cli": cli, "help": help, **meta})


@dataclass
class StudentSpec:
    """Student architecture."""

    arch: str = cli_field("gcn", "--student-arch")
    layers: int = cli_field(2, "--student-layers")
    hidden: int = cli_field(8, "--student-hidden")
    dropout: float = cli_field(0.5, "--student-dropout")


@dataclass
class TeacherSpec:
    """Teacher to load (``path``) or to train first (the other fields).

    :func:`abkd_deploy.distill.teacher.resolve_teacher` turns it into a teacher run dir.
    """

    path: str | None = cli_field(
        None,
        "--teacher",
        "Run dir of a trained teacher (abkd-deploy teacher). "
        "Without it a teacher is trained first with the --teacher-* options.",
        path=True,
    )
    arch: str = cli_field("gcnii", "--teacher-arch")
    layers: int = cli_field(16, "--teacher-layers")
    hidden: int = cli_field(64, "--teacher-hidden")
    dropout: float | None = None
    epochs: int | None = cli_field(
        None, "--teacher-epochs", "Epochs for the teacher trained here (default: --epochs)."
    )


@dataclass
class KDSpec:
    """Distillation method and its hyper-parameters (docs/ARCHITECTURE.md section 6)."""

    method: str = "abkd"
    alpha: float = cli_field(
        0.7, "--alpha", "Weight of the logit-KD term; CE gets 1 - alpha.", objective=True
    )
    tau: float = cli_field(4.0, "--tau", "KD temperature.", objective=True)
    beta: float = cli_field(
        1.0, "--beta", "Weight of the method's own term (ABKD: L_att).", objective=True
    )
    dissimilarity: str = cli_field(
        "feature",
        "--abkd-dissimilarity",
        choices=("feature", "similarity"),
        term="abkd",
        option="dissimilarity",
    )
    attention: str | None = cli_field(
        None,
        "--abkd-attention",
        "How ABKD weights teacher layers (default: learned, the paper's; "
        "docs/benchmarks/abkd-attention.md compares them).",
        choices=ABKD_ATTENTIONS,
        term="abkd",
        option="attention",
    )
    entropy_floor: float | None = cli_field(
        None,
        "--abkd-entropy-floor",
        "Lower bound on each attention row's entropy, as a fraction of log(teacher "
        "layers) in [0, 1) (default: 0.5 with --abkd-attention entropy, else off).",
        bounds={"min": 0.0, "max": 1.0, "max_open": True},
        term="abkd",
        option="entropy_floor",
    )
    prior_temperature: float | None = cli_field(
        None,
        "--abkd-prior-temperature",
        "Temperature on the z-scored D of --abkd-attention prior (default 1).",
        bounds={"min": 0.0, "min_open": True},
        term="abkd",
        option="prior_temperature",
    )
    holdout: float | None = cli_field(
        None,
        "--abkd-holdout",
        "With --abkd-attention align or prior: hold this fraction of the labelled nodes out "
        "of the student's cross-entropy and train the attention on their loss (default: off).",
        bounds={"min": 0.0, "max": 1.0, "max_open": True},
        term="abkd",
        option="holdout",
    )
    kd_nodes: int | None = cli_field(
        None,
        "--kd-nodes",
        "Node sample for the ABKD dissimilarity; 0 = all nodes (default: feature: "
        "all nodes up to 4096, else 1024; similarity: 512).",
        term="abkd",
        option="kd_nodes",
    )
    #: None: the objective's default (20 epochs for abkd, else 0).
    warmup_epochs: int | None = cli_field(
        None,
        "--warmup-epochs",
        "Ramp beta up from 0 over this many epochs (default: 20 for abkd, whose "
        "unit-normalised feature loss otherwise swamps a fresh student; 0 otherwise).",
        objective=True,
    )
    normalize: bool | None = cli_field(
        None,
        "--normalize/--no-normalize",
        "Scale auxiliary terms to the KD term's magnitude at the first "
        "step (default: on for abkd).",
        objective=True,
    )
    teacher_mode: str = cli_field("frozen", "--teacher-mode", choices=("frozen", "joint"))
    #: Further options of the method's terms, by keyword (Python only).
    options: dict[str, Any] = field(default_factory=dict)

    def term_options(self) -> dict[str, Any]:
        """Options for the method's loss terms: ``options`` plus every field declaring a
        ``term`` equal to ``method`` whose value is set (``options`` wins)."""
        opts = dict(self.options)
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("term") == self.method and value is not None:
                opts.setdefault(f.metadata["option"], value)
        return opts

    def objective(self, dims: LayerDims) -> Objective:
        """The :class:`~abkd_deploy.distill.objective.Objective` of this spec (imports torch)."""
        from abkd_deploy.distill.objective import Objective

        settings = {
            f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("objective")
        }
        return Objective.from_method(self.method, dims, **settings, **self.term_options())
