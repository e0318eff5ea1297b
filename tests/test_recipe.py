"""Ensembles and recipes: members that differ only in seed, decoded together; runs of several steps
that resume wherever they stopped, between steps or inside one."""

import io
import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console

from cli import main
from decoder.config import CaptionerConfig
from decoder.ensemble import Ensemble
from decoder.model import PooledCaptioner
from decoder.search import beam_search
from store.rundir import RunDir
from tests.helpers import TINY, one_line_error, run_cli
from training.recipe import Plan, train_run

OPTIONS = {"epochs": 1, "embed_size": 16, "hidden_size": 16, "batch_size": 64}  # two batches per step


def tiny(seed: int) -> PooledCaptioner:
    torch.manual_seed(seed)
    return PooledCaptioner(CaptionerConfig(vocab_size=9, feature_dim=6, embed_size=8, hidden_size=8)).eval()


def test_an_ensemble_averages_the_members_probabilities():
    a, b = tiny(0), tiny(1)
    features, tokens = torch.randn(3, 6), torch.tensor([1, 1, 1])
    both = Ensemble([a, b])
    logprobs, _ = both.step(tokens, both.init_state(features))
    pa, _ = a.step(tokens, a.init_state(features))
    pb, _ = b.step(tokens, b.init_state(features))
    assert torch.allclose(logprobs.exp(), (pa.exp() + pb.exp()) / 2, atol=1e-6)
    one = Ensemble([a])  # an ensemble of one searches exactly like its member
    assert beam_search(one, features, 1, 2, beam=3) == beam_search(a, features, 1, 2, beam=3)


@pytest.fixture(scope="module")
def ensemble(featurized, tmp_path_factory):
    """A 2-member ensemble run and what `train` said; tests copy it before changing it."""
    run = tmp_path_factory.mktemp("ensemble") / "ens"
    out = run_cli("train", featurized, "--run", run, "--members", 2, "--epochs", 1, *TINY)
    return run, out.stderr


def test_members_train_with_their_own_seed_and_caption_together(featurized, ensemble):
    run, said = ensemble
    assert "member 2/2" in said
    members = RunDir(run).members()
    assert [m.name for m in members] == ["0", "1"]
    seeds = [torch.load(m.last, weights_only=True)["config"]["decoder"]["seed"] for m in members]
    assert seeds == [0, 1]
    plan = Plan.load(RunDir(run))
    assert plan.members == 2 and plan.done == [[0, 0], [1, 0]]
    image = sorted((featurized.parent / "synth" / "images").glob("*.png"))[0]
    rows = json.loads(run_cli("caption", image, "--run", run, "--format", "json", "--workers", 0).stdout)
    assert rows[0]["caption"]
    out = run_cli("evaluate", run, "--split", "val")
    assert "2 members" in out.stdout and RunDir(run).eval_json("val").is_file()


def test_members_with_other_vocabularies_are_refused(featurized, ensemble, tmp_path):
    run = tmp_path / "ens"
    shutil.copytree(ensemble[0], run)
    second = RunDir(run).member(1)
    state = torch.load(second.best, weights_only=True)
    state["vocab"] = [*state["vocab"][:-1], "zebra"]
    torch.save(state, second.best)
    image = sorted((featurized.parent / "synth" / "images").glob("*.png"))[0]
    out = run_cli("caption", image, "--run", run, "--workers", 0, check=False)
    assert out.returncode == 1 and "another vocabulary" in out.stderr and out.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "steps", [[("decoder", OPTIONS)], [("decoder", OPTIONS), ("scst", {"epochs": 1, "batch_size": 32})]]
)
def test_a_recipe_interrupted_anywhere_ends_where_an_uninterrupted_one_does(featurized, tmp_path, steps, monkeypatch):
    """Two members, one or two steps each; a session of one batch at a time, resumed until done."""
    import training.recipe

    monkeypatch.setattr(training.recipe, "RECIPE", tuple(steps))
    quiet = Console(file=io.StringIO())
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    first = dict(steps[0][1])
    kwargs = {"phase": None, "members": 2, "console": quiet}
    train_run(featurized, straight, resume=False, max_minutes=None, options=first, **kwargs)
    outcome = train_run(featurized, stopped, resume=False, max_minutes=1e-9, options=first, **kwargs)
    sessions = 1
    while outcome.status != "finished":
        outcome = train_run(None, stopped, resume=True, max_minutes=1e-9, options={}, **kwargs)
        sessions += 1
    assert sessions > 4
    for a, b in zip(RunDir(straight).members(), RunDir(stopped).members(), strict=True):
        sa, sb = torch.load(a.last, weights_only=True), torch.load(b.last, weights_only=True)
        assert sa["phase"] == sb["phase"] == steps[-1][0] and sa["step"] == sb["step"]
        assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert Plan.load(RunDir(stopped)).done == Plan.load(RunDir(straight)).done


def test_a_phase_added_to_an_ensemble_runs_for_every_member(featurized, ensemble, tmp_path):
    run = tmp_path / "ens"
    shutil.copytree(ensemble[0], run)
    run_cli("train", "--run", run, "--phase", "scst", "--epochs", 1, "--batch-size", 4)
    assert all(torch.load(m.last, weights_only=True)["phase"] == "scst" for m in RunDir(run).members())
    assert Plan.load(RunDir(run)).steps[1][0] == "scst"
    shutil.rmtree(RunDir(run).member(1).path)  # a member lost: caption still works with the rest
    image = sorted((featurized.parent / "synth" / "images").glob("*.png"))[0]
    assert json.loads(run_cli("caption", image, "--run", run, "--format", "json", "--workers", 0).stdout)[0]["caption"]


def test_a_recipe_run_resumes_with_the_options_its_steps_were_given(ensemble, tmp_path):
    run = tmp_path / "ens"
    shutil.copytree(ensemble[0], run)
    before = RunDir(run).recipe.read_text()
    line = one_line_error(CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "--epochs", "3"]))
    assert (
        line
        == f"Error: {run} follows recipe.json, whose steps keep the options they were given: resume it without --epochs"
    )
    assert RunDir(run).recipe.read_text() == before


def test_a_recipe_file_written_before_options_were_checked_still_loads(tmp_path):
    """Such files keep --weights beside the steps and may hold options the step's phase ignored."""
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    steps = [["decoder", {"epochs": 2, "cnn_lr": 1e-5}], ["scst", {"epochs": 1, "hidden_size": 8}]]
    old = {"steps": steps, "members": 2, "done": [[0, 0]], "workdir": "data/w", "weights": "none"}
    run.recipe.write_text(json.dumps(old))
    plan = Plan.load(run)
    assert plan.steps == [("decoder", {"epochs": 2, "weights": "none"}), ("scst", {"epochs": 1})]
    assert (plan.members, plan.done, plan.workdir) == (2, [[0, 0]], "data/w")
