"""pycocoevalcap scoring: exact captions score perfectly, unrelated ones near zero, METEOR closes."""

from qstudy.metrics import CaptionScorer

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
