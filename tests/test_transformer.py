"""The transformer decoder (decoder/transformer.py): cached stepping equals teacher forcing, tied
weights, search and ensembles over its state, its training options and their refusals. The
guarantees it shares with the attention decoder (resume, refusals of a store, every phase, heat
maps) are the parameterised tests of test_attention.py, test_train.py, test_faults_training.py and
test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from cli import main
from decoder.attention import Regions
from decoder.config import CaptionerConfig
from decoder.ensemble import Ensemble, check_members_agree
from decoder.factory import build_captioner, reads_maps
from decoder.model import caption_loss, smoothed_caption_loss
from decoder.search import beam_search, greedy
from decoder.transformer import TransformerCaptioner
from store.errors import UserError
from tests.helpers import one_line_error

START, END = 1, 2


def tiny(seed: int = 0, layers: int = 2, vocab_size: int = 20, **kw) -> TransformerCaptioner:
    torch.manual_seed(seed)
    config = CaptionerConfig(
        vocab_size=vocab_size, feature_dim=32, hidden_size=16, heads=4, num_layers=layers, decoder="transformer", **kw
    )
    return TransformerCaptioner(config).eval()


def test_cached_steps_give_the_teacher_forced_next_word_probabilities():
    """Decoding one word at a time from the key/value cache gives what the full causal forward
    gives at every real position, for captions of different lengths in one batch."""
    model = tiny(layers=3)
    captions = torch.tensor([[1, 5, 2, 0, 0, 0], [1, 7, 8, 9, 10, 2], [1, 4, 6, 2, 0, 0], [1, 3, 11, 12, 2, 0]])
    regions = torch.randn(4, 6, 32)
    with torch.no_grad():
        logits = model(regions, captions)  # (4, 5, V)
        state = model.init_state(regions)
        for t in range(captions.size(1) - 1):
            logprobs, state = model.step(captions[:, t], state)
            assert state[0].shape == (4, 4, t + 1, 4)  # (heads, B, words so far, head size): the cache grows
            real = captions[:, t + 1] != 0
            expected = torch.log_softmax(logits[real, t], -1)
            torch.testing.assert_close(logprobs[real], expected, rtol=1e-5, atol=1e-5)
        assert (logits[captions[:, 1:] == 0] == 0).all()  # positions past <end> are not computed


def test_an_untrained_transformer_of_the_default_size_starts_near_uniform_not_repeating_its_input():
    """With tied weights, an input word that dominated the last layer's input would get a large logit
    of its own: an untrained decoder would repeat its input at a loss far above log V."""
    torch.manual_seed(0)
    vocab = 37
    model = TransformerCaptioner(CaptionerConfig(vocab_size=vocab, num_layers=2, decoder="transformer")).eval()
    captions = torch.cat([torch.ones(8, 1, dtype=torch.long), torch.randint(4, vocab, (8, 11))], 1)
    with torch.no_grad():
        logits = model(torch.relu(torch.randn(8, 64, 2048)), captions)  # non-negative, like Inception's maps
    assert caption_loss(logits, captions).item() < math.log(vocab) + 0.5
    assert (logits.argmax(-1) == captions[:, :-1]).float().mean() < 0.2  # not its input word


def test_grouped_regions_give_what_one_map_per_caption_gives():
    model = tiny()
    maps, photo = torch.randn(2, 5, 32), torch.tensor([1, 0, 1])
    captions = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0], [1, 8, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(model(Regions(maps, photo), captions), model(maps[photo], captions))


def test_the_output_layer_is_the_word_embedding_and_a_checkpoint_loads_with_weights_only(tmp_path):
    model = tiny()
    assert model.head.weight is model.embed.weight
    assert sum(p is model.embed.weight for p in model.parameters()) == 1  # one parameter, trained once
    torch.save({"model": model.state_dict()}, tmp_path / "m.pt")
    state = torch.load(tmp_path / "m.pt", weights_only=True)["model"]
    again = build_captioner(model.config).eval()
    again.load_state_dict(state)
    regions = torch.randn(3, 5, 32)
    assert greedy(again, regions, START, END) == greedy(model, regions, START, END)
    assert reads_maps(model.config) and reads_maps(model.config.to_dict())


def test_heads_must_divide_the_width():
    with pytest.raises(UserError, match=r"width \(--hidden-size 16\) must be a multiple of --heads 3"):
        TransformerCaptioner(CaptionerConfig(vocab_size=9, hidden_size=16, heads=3, decoder="transformer"))


def test_batched_beam_search_equals_one_photo_at_a_time():
    """Beams of every photo advance together, their caches selected by beam: the same captions."""
    model = tiny(seed=3, vocab_size=15)
    photos = torch.randn(5, 6, 32) * 3
    batched = beam_search(model, photos, START, END, beam=3, max_len=8)
    alone = [beam_search(model, photos[i : i + 1], START, END, beam=3, max_len=8)[0] for i in range(5)]
    assert batched == alone
    assert beam_search(model, photos, START, END, beam=1, max_len=8) == greedy(model, photos, START, END, 8)


def test_an_ensemble_mixes_attention_and_transformer_members():
    """Both read the maps: their probabilities average, and checkpoints of both kinds load as one
    ensemble; a pooled member (another input) is refused."""
    torch.manual_seed(1)
    attention = build_captioner(
        CaptionerConfig(vocab_size=20, feature_dim=32, embed_size=8, hidden_size=16, decoder="attention")
    ).eval()
    transformer = tiny(seed=2)
    ensemble = Ensemble([attention, transformer])
    regions, tokens = torch.randn(3, 6, 32), torch.full((3,), START)
    with torch.no_grad():
        mixed, _ = ensemble.step(tokens, ensemble.init_state(regions))
        a, _ = attention.step(tokens, attention.init_state(regions))
        b, _ = transformer.step(tokens, transformer.init_state(regions))
    torch.testing.assert_close(mixed, torch.log(0.5 * a.exp() + 0.5 * b.exp()))
    assert len(beam_search(ensemble, regions, START, END, beam=3, max_len=6)) == 3

    def state(decoder: str) -> dict:
        return {"vocab": ["<pad>", "x"], "config": {"model": {"decoder": decoder}}, "store": {"maps_crops": 1}}

    check_members_agree([state("attention"), state("transformer")], ["a.pt", "t.pt"])
    with pytest.raises(UserError, match="a pooled decoder and t.pt a transformer one: ensemble members must read"):
        check_members_agree([state("transformer"), state("pooled")], ["t.pt", "p.pt"])


def test_label_smoothing_is_torchs_and_the_logged_loss_stays_the_plain_cross_entropy():
    logits = torch.randn(3, 5, 11)
    captions = torch.tensor([[1, 4, 5, 6, 2, 0], [1, 7, 2, 0, 0, 0], [1, 8, 9, 10, 3, 2]])
    smoothed, plain = smoothed_caption_loss(logits, captions, 0.1)
    expected = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 11), captions[:, 1:].reshape(-1), ignore_index=0, label_smoothing=0.1
    )
    torch.testing.assert_close(smoothed, expected)
    torch.testing.assert_close(plain, caption_loss(logits, captions))
    assert smoothed_caption_loss(logits, captions, 0.0)[0] == pytest.approx(plain.item())


def test_the_learning_rate_warms_up_linearly_as_a_function_of_the_step():
    from training.phases.decoder import warmed_up

    assert [warmed_up(1e-3, 4, s) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])


def test_the_transformer_decoder_has_its_own_defaults():
    from training.options import decoder_defaults

    expected = {
        "epochs": 20,
        "select_by": "cider",
        "label_smoothing": 0.1,
        "warmup_steps": 400,
        "num_layers": 2,
        "dropout": 0.3,
        "hidden_size": 256,
    }
    assert decoder_defaults("transformer", 3_000) == decoder_defaults("transformer", 30_000) == expected
    assert CaptionerConfig(vocab_size=9).heads == 4 and CaptionerConfig(vocab_size=9).hidden_size == 512


@pytest.mark.parametrize(
    "decoder,args,refused",
    [
        ("pooled", ["--heads", "4"], "--heads is an option of the transformer decoder, not of the pooled decoder"),
        (
            "attention",
            ["--heads", "4"],
            "--heads is an option of the transformer decoder, not of the attention decoder",
        ),
        (
            "transformer",
            ["--embed-size", "8"],
            "--embed-size is an option of the pooled and attention decoders, not of the transformer decoder",
        ),
        (
            "transformer",
            ["--attention-size", "8"],
            "--attention-size is an option of the attention decoder, not of the transformer decoder",
        ),
        (
            "pooled",
            ["--group-by-photo"],
            "--group-by-photo is an option of the attention and transformer decoders, not of the pooled decoder",
        ),
    ],
)
def test_an_option_the_decoder_does_not_read_is_refused_in_one_line(decoder, args, refused, tmp_path):
    """Before anything is read or written (WORKDIR does not exist), and the same from Python."""
    import legende

    work, run = tmp_path / "nowhere", tmp_path / "run"
    line = one_line_error(
        CliRunner().invoke(main, ["train", str(work), "--run", str(run), "--decoder", decoder, *args])
    )
    assert line == f"Error: {refused}"
    name = args[0][2:].replace("-", "_")
    with pytest.raises(UserError) as error:
        legende.train(work, run, decoder=decoder, **{name: int(args[1]) if len(args) > 1 else True})
    assert str(error.value) == refused
    assert not run.exists()


def test_the_default_decoder_refuses_the_transformers_options_once_the_store_says_which_it_is(featurized, tmp_path):
    line = one_line_error(
        CliRunner().invoke(main, ["train", str(featurized), "--run", str(tmp_path / "r"), "--heads", "2"])
    )
    assert line == "Error: --heads is an option of the transformer decoder, not of the pooled decoder"
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_resumed_run_refuses_an_option_its_decoder_does_not_read(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    line = one_line_error(CliRunner().invoke(main, ["train", "--run", str(run), "--resume", "--heads", "2"]))
    assert line == "Error: --heads is an option of the transformer decoder, not of the pooled decoder"
