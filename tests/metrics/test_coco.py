"""pycocoevalcap scoring: exact captions score perfectly, unrelated ones near zero, METEOR closes."""

import os

import pytest

from qstudy.metrics import CaptionScorer, ScorerProcessDied

REFERENCES = {
    "a": ["a red circle moves left", "the red circle is moving left", "a red circle slides left"],
    "b": ["a blue square moves up", "a square that is blue goes up", "the blue square is moving up"],
}


def test_scores_order_perfect_partial_and_wrong_captions():
    with CaptionScorer() as scorer:
        perfect = scorer.score({"a": "a red circle moves left", "b": "a blue square moves up"}, REFERENCES)
        partial = scorer.score({"a": "a red square moves up", "b": "a blue circle moves left"}, REFERENCES)
        wrong = scorer.score({"a": "", "b": "zebra"}, REFERENCES)
        process = scorer._meteor.meteor_p
    assert perfect["bleu4"] > 0.99 and perfect["meteor"] > 0.99 and perfect["rouge_l"] > 0.99
    assert perfect["cider"] > partial["cider"] > wrong["cider"] >= 0
    assert set(perfect) == {"bleu4", "meteor", "rouge_l", "cider"}
    assert process.poll() is not None  # the METEOR JVM is gone once the scorer closes


def test_without_meteor():
    with CaptionScorer(meteor=False) as scorer:
        # CIDEr's IDF needs more than one clip: with one, every n-gram has IDF log(1/1) = 0.
        scores = scorer.score({"a": "a red circle moves left", "b": "a blue square moves up"}, REFERENCES)
    assert "meteor" not in scores and scores["cider"] > 0


def test_scores_equal_pycocoevalcaps_own_pipeline():
    """One tokenizer call for hypotheses and references scores exactly as tokenizing each side apart does."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {**REFERENCES, "c": ["A green triangle, moving down.", "the green triangle goes down!"]}
    predictions = {"a": "a red circle moves left.", "b": "A blue square, moving up", "c": "green green green"}
    tokenizer = PTBTokenizer()
    hypotheses = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    refs = tokenizer.tokenize({i: [{"caption": c} for c in cs] for i, cs in references.items()})
    expected = {"bleu4": Bleu(4).compute_score(refs, hypotheses, verbose=0)[0][3],
                "rouge_l": Rouge().compute_score(refs, hypotheses)[0], "cider": Cider().compute_score(refs, hypotheses)[0]}
    with CaptionScorer(meteor=False) as scorer:
        assert scorer.score(predictions, references) == expected


def test_a_killed_meteor_jvm_is_named_as_such(tmp_path):
    """A trial's kill takes its JVMs first: the scorer must say so, not fail with a parse error."""
    with CaptionScorer() as scorer:
        scorer._meteor.meteor_p.kill()
        scorer._meteor.meteor_p.wait()
        with pytest.raises(ScorerProcessDied, match="METEOR"):
            scorer.score({"a": "a red circle moves left", "b": "a blue square moves up"}, REFERENCES)


def test_a_tokenizer_jvm_that_dies_is_named_as_such(tmp_path, monkeypatch):
    java = tmp_path / "java"  # the PTB tokenizer runs `java` from PATH: this one is killed at once
    java.write_text("#!/bin/sh\nkill -9 $$\n")
    java.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with CaptionScorer(meteor=False) as scorer:
        with pytest.raises(ScorerProcessDied, match="PTB tokenizer"):
            scorer.score({"a": "a red circle moves left", "b": "a blue square moves up"}, REFERENCES)
