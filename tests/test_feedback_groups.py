"""Feedback records -> RM training groups (train/feedback_groups.py), and the trainer's split of them."""
from __future__ import annotations

from rlhf.v1 import feedback_pb2 as fb
from train.feedback_groups import GroupCounter, groups_from_records
from train.loop import split_heldout
from serve.reward_model import TRUNCATED, rm_text

P = "\n\nHuman: how do I bake bread?\n\nAssistant:"


def resp(text, rid="", finish=""):
    return fb.Response(response_id=rid, text=text, model_version="v0001", finish_reason=finish)


def rec(event_id, **kind):
    return fb.FeedbackRecord(event_id=event_id, feedback=fb.Feedback(**kind)).SerializeToString()


def comparison(eid, a, b, choice, prompt=P):
    return rec(eid, comparison=fb.Comparison(event_id=eid, prompt=prompt, a=a, b=b, preferred=choice))


def rating(eid, r, prompt=P, rater="u1", thumbs=None, likert=None):
    kw = {"thumbs_up": thumbs} if thumbs is not None else {"likert": likert}
    return rec(eid, rating=fb.Rating(event_id=eid, prompt=prompt, response=r,
                                     source=fb.Source(kind=fb.SOURCE_KIND_USER, id=rater), **kw))


def test_comparisons_rankings_and_truncation_mark():
    recs = [comparison("e1", resp("good", "r1", "eos"), resp("cut off mid", "r2", "length"), fb.Comparison.CHOICE_B),
            comparison("e2", resp("x", "r3"), resp("y", "r4"), fb.Comparison.CHOICE_TIE),
            rec("e3", ranking=fb.Ranking(event_id="e3", prompt=P, responses=[resp("1st"), resp("2nd"), resp("3rd")]))]
    g = groups_from_records(recs + [comparison("e4", resp("p"), resp("q"), 99)])   # out of range: trains nothing
    assert [x.event_id for x in g] == ["e1", "e2", "e3"] and all(x.prompt == P for x in g)
    # B preferred: best first; the response cut at max_new_tokens is marked for the RM
    assert g[0].texts == (rm_text(P, "cut off mid", truncated=True), rm_text(P, "good"))
    assert g[0].texts[0].endswith(TRUNCATED) and not g[0].texts[1].endswith(TRUNCATED) and not g[0].tie
    assert g[1].tie and g[2].texts == tuple(rm_text(P, t) for t in ("1st", "2nd", "3rd"))


def test_ratings_of_one_prompt_by_one_rater_become_comparisons():
    recs = [rating("a", resp("A", "ra"), likert=6), rating("b", resp("B", "rb"), likert=2),
            rating("c", resp("C", "rc"), likert=6),
            rating("d", resp("D", "rd"), rater="u2", likert=1),      # another rater: not compared with u1's
            rating("e", resp("E", "re"), prompt="\n\nHuman: other?\n\nAssistant:", likert=7),   # alone
            rating("f", resp("F", "rf"), thumbs=True), rating("g", resp("G", "rg"), thumbs=False)]  # thumbs apart
    g = groups_from_records(recs)
    got = {(x.texts, x.tie) for x in g}
    t = {k: rm_text(P, k) for k in "ABCFG"}
    assert got == {((t["A"], t["B"]), False), ((t["A"], t["C"]), True), ((t["C"], t["B"]), False),
                   ((t["F"], t["G"]), False)}
    assert len(g) == 4
    # a later rating of the same response by the same rater replaces the earlier one
    g2 = groups_from_records(recs[:2] + [rating("b2", resp("B", "rb"), likert=7)])
    assert [(x.texts, x.tie) for x in g2] == [((t["B"], t["A"]), False)]


def test_group_counter_matches_the_groups_and_ignores_lone_ratings():
    recs = [rating("a", resp("A", "ra"), likert=6), comparison("e1", resp("x"), resp("y"), fb.Comparison.CHOICE_A),
            rating("b", resp("B", "rb"), likert=2), rating("c", resp("C", "rc"), likert=5),
            rating("a2", resp("A", "ra"), likert=1)]   # re-rating: no new pair
    c = GroupCounter()
    added = [c.add(r) for r in recs]
    assert added == [0, 1, 1, 2, 0] and c.total == 4 == len(groups_from_records(recs))


def test_split_heldout_keeps_every_prompt_on_one_side():
    prompts = [f"\n\nHuman: q{i}\n\nAssistant:" for i in range(200)]
    recs = [comparison(f"e{i}-{k}", resp("a"), resp("b"), fb.Comparison.CHOICE_A, prompt=p)
            for i, p in enumerate(prompts) for k in range(3)]          # 3 comparisons per prompt, new ids
    train, test = split_heldout(groups_from_records(recs), 0.2)
    assert test and train
    assert not {g.prompt for g in train} & {g.prompt for g in test}
    assert len(train) + len(test) == 600
