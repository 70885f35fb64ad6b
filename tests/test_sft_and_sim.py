"""train.sft's token stream (EOS ends every assistant turn), the shipped data and the simulator's
prompts and true preference."""
from __future__ import annotations

import json
import math

from common.data import HH_PAIRS
from sim.preference import true_score
from sim.traffic import first_turn_prompts, prompt_split
from train.sft import fitted_turn, lr_at, token_stream, turns


class CharTok:
    """One token per character (ids are code points); EOS is 0."""
    eos_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_token_stream_ends_every_assistant_turn_with_eos():
    t = "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ok?\n\nAssistant: no"
    assert turns(t) == ["\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman: ok?\n\nAssistant: no"]
    ids = token_stream(CharTok(), [t, "plain"]).tolist()
    want = [ord(c) for c in "\n\nHuman: hi\n\nAssistant: yo"] + [0] + \
           [ord(c) for c in "\n\nHuman: ok?\n\nAssistant: no"] + [0] + [ord(c) for c in "plain"] + [0]
    assert ids == want


def test_long_answers_are_cut_after_the_last_whole_sentence_that_fits_or_dropped():
    tok = CharTok()   # one token per character: budgets below count characters
    turn = "\n\nHuman: why?\n\nAssistant: Because. It is so! Really?"
    # the answer " Because. It is so! Really?" is 27 characters; its sentences end at 9, 19 and 27
    assert fitted_turn(tok, turn, 0) == turn                      # 0: whole
    assert fitted_turn(tok, turn, 27) == turn                     # fits as it is
    assert fitted_turn(tok, turn, 26) == "\n\nHuman: why?\n\nAssistant: Because. It is so!"
    assert fitted_turn(tok, turn, 19) == "\n\nHuman: why?\n\nAssistant: Because. It is so!"
    assert fitted_turn(tok, turn, 18) == "\n\nHuman: why?\n\nAssistant: Because."
    assert fitted_turn(tok, turn, 8) is None                      # not even the first sentence fits
    assert fitted_turn(tok, "\n\nHuman: Hi. Who?\n\nAssistant: Nobody here.", 5) is None   # the human turn's "." is not the answer's
    assert fitted_turn(tok, "plain text, no dialogue", 3) == "plain text, no dialogue"
    # a quote or bracket closing the sentence stays with it; "e.g.x" is not a sentence end
    assert fitted_turn(tok, '\n\nHuman: q\n\nAssistant: "Yes." e.g.x more words', 8) == '\n\nHuman: q\n\nAssistant: "Yes."'
    # in the stream a dropped turn leaves nothing, not even its EOS
    t = "\n\nHuman: a\n\nAssistant: Ok. Fine.\n\nHuman: b\n\nAssistant: Nope nope nope"
    want = [ord(c) for c in "\n\nHuman: a\n\nAssistant: Ok."] + [0]
    assert token_stream(tok, [t], 5).tolist() == want


def test_sft_schedule_warms_up_then_decays_to_a_tenth():
    # by hand: peak 1e-3, 20 warm-up steps, cosine over 100 steps down to 10% of the peak
    assert abs(lr_at(0, 100, 1e-3) - 1e-3 / 20) < 1e-12                  # (0+1)/20 of the peak, decay ~1
    assert abs(lr_at(19, 100, 1e-3) - 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * 0.19)))) < 1e-12
    assert abs(lr_at(50, 100, 1e-3) - 1e-3 * 0.55) < 1e-12               # halfway: 0.1 + 0.9 * 0.5
    assert abs(lr_at(100, 100, 1e-3) - 1e-4) < 1e-12
    assert abs(lr_at(500, 100, 1e-3) - 1e-4) < 1e-12                    # past the estimate: stays at the floor


def test_the_data_ships_with_its_licence_and_gives_disjoint_prompt_sets():
    rows = [json.loads(x) for x in HH_PAIRS.read_text().splitlines()]
    assert len(rows) == 1800 and all(r["chosen"] != r["rejected"] for r in rows)
    assert "MIT License" in (HH_PAIRS.parent / "LICENSE-hh-rlhf").read_text()
    users, held = prompt_split(HH_PAIRS, n_eval=128)
    assert len(held) == 128 and not set(users) & set(held)
    assert len(users) + len(held) == len(first_turn_prompts(HH_PAIRS))
    assert prompt_split(HH_PAIRS, 128) == (users, held)      # the same split whatever the run
    assert all(p.startswith("\n\nHuman: ") and p.endswith("\n\nAssistant:") for p in held)


def test_true_score_by_hand_and_cut_off_answers_lose():
    from sim.preference import COMMON, KIND, topic_words
    prompt = "\n\nHuman: What should I cook tonight with rice?\n\nAssistant:"
    assert topic_words(prompt) == {"cook", "tonight", "rice"}
    r = "Sure, you could cook rice tonight. I hope this helps you and your friend"   # 14 words, none rude
    words = ["sure", "you", "could", "cook", "rice", "tonight", "i", "hope", "this", "helps", "you", "and", "your",
             "friend"]
    common = sum(w in COMMON for w in words)
    kind = len(set(words) & KIND)                        # sure, hope, friend: each counted once
    assert kind == 3
    # relevance 3 of 3 topic words; courtesy per max(14, 16) words; 13 distinct of 14: nothing repeated past 30%
    assert abs(true_score(prompt, r) - (0.5 * common / 14 + 0.5 + kind / 16)) < 1e-12
    assert abs(true_score(prompt, r, truncated=True) - (true_score(prompt, r) - 0.2)) < 1e-12
    assert true_score("", "") == -0.5
    assert true_score("", "thank you") == 0.5 * 1.0 + 1 / 16 - 0.2   # under 8 words; "you" is not courtesy
    # one word eight times: common share 1, courtesy 0, 7/8 repeated -> 0.875 - 0.3 off; below a plain answer
    assert abs(true_score("", "you you you you you you you you") - (0.5 - 0.575)) < 1e-12
    assert true_score("", "you you you you you you you you") < 0 < true_score(prompt, r)