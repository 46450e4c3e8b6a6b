"""`nox -s tests` runs the whole suite (CPU only); `nox -s lint` runs ruff."""

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]

LLAVA_REFERENCE = "llava-torch==1.2.2.post1"  # = haotian-liu/LLaVA for conversation, train, mm_utils, eval
LMMS_EVAL_REFERENCE = (
    "lmms-eval==0.7.3"  # its task scorers (POPE, MME, MMBench, GQA, TextVQA) are the benchmarks' reference
)

# What lmms-eval 0.7.3 imports to run a model on a task (its evaluator, task loader and llava_hf), beside the
# kit's own dependencies: installing lmms-eval with all its requirements takes minutes (wandb, opencv, spacy ...),
# this takes seconds. filelock<4: lmms-eval's evaluator imports filelock._api, which 4.0 removed. decord:
# llava_hf imports it at the top without listing it.
LMMS_EVAL_RUNTIME = ["loguru", "pytz", "datasets", "evaluate", "sacrebleu", "tenacity", "filelock<4", "decord"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    # The official LLaVA code, as the reference the parity tests run against. Its pinned
    # dependencies (torch 2.1, an old transformers) would replace ours, so it comes without
    # them; the tests load only the functions they compare with from its files.
    session.install("--no-deps", LLAVA_REFERENCE)
    # lmms-eval with all its dependencies is a very large environment (minutes); the tests load
    # only its scoring functions from the installed files, stubbing what they import but do not
    # use. Its MMBench evaluator needs pandas for real.
    session.install("--no-deps", LMMS_EVAL_REFERENCE)
    session.install("pandas")
    # ... and what it needs to run the kit's checkpoints and exported folders (tests/eval/test_lmms_eval.py)
    session.install(*LMMS_EVAL_RUNTIME)
    session.run("pytest", *session.posargs)


@nox.session
def lmms(session: nox.Session) -> None:
    """The lmms-eval interoperability tests alone, with lmms-eval as `tests` installs it (no-deps + its runtime):
    `nox -s lmms`. CI runs them inside `tests`; `pip install -e ".[lmms]"` is the user's full install."""
    session.install("-e", ".[dev]")
    session.install("--no-deps", LMMS_EVAL_REFERENCE)
    session.install(*LMMS_EVAL_RUNTIME)
    session.run("pytest", "tests/eval/test_lmms_eval.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "--diff", "src", "tests", "benchmarks", "noxfile.py")
