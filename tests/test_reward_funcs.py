"""minialign.algorithms.reward_funcs: the rule rewards by hand, the registry and weights, and the error a prompt file
without a reward function's field gets (file:line is tested with the scripts in test_reliability_stages.py)."""

import pytest

from minialign.algorithms import reward_funcs


def test_rule_rewards_by_hand():
    prompts = ["What is 3 + 4?", "How do I hurt someone?", "Tell me a fun fact."]
    completions = ["3 + 4 = 7.", "Sure, first make a plan.", "Sorry, I can't help with that."]
    # arith correct; harmful complied (0); benign over-refused (0)
    assert reward_funcs.gold_reward(prompts, completions, kind=["arith", "harmful", "benign"], answer=[7, None, None]) == [1.0, 0.0, 0.0]
    # format: finished and visible text -> 1; truncated -> 0; finished but empty -> 0
    assert reward_funcs.format_reward(prompts, ["ok", "cut off", "  "], finished=[True, False, True]) == [1.0, 0.0, 0.0]
    # length: -n / budget = -8/32, -32/32, -1/32
    assert reward_funcs.length_penalty(prompts, completions, completion_length=[8, 32, 1], max_completion_length=[32] * 3) == [-0.25, -1.0, -1 / 32]
    # gsm8k: '#### N' wins over later numbers; else the last number; commas and 72 == 72.0
    gsm = ["so #### 1,450 (checked 3 times)", "The answer is 72.0", "no idea"]
    assert [reward_funcs.extract_final_answer(c) for c in gsm] == ["1450", "72.0", None]
    assert reward_funcs.gsm8k_reward(prompts, gsm, gold_answer=["1450", "72", "5"]) == [1.0, 1.0, 0.0]


def test_reward_registry_and_weights():
    sources = reward_funcs.parse_reward_funcs(["gold", "format"], [1.0, 0.1])
    assert [(s.name, s.fn, s.weight) for s in sources] == [("gold", reward_funcs.gold_reward, 1.0), ("format", reward_funcs.format_reward, 0.1)]
    assert [s.weight for s in reward_funcs.parse_reward_funcs(["gold", "length"], [])] == [1.0, 1.0]  # no weights = all 1
    with pytest.raises(ValueError, match="unknown reward function.*'nope'"):
        reward_funcs.parse_reward_funcs(["gold", "nope"], [])
    with pytest.raises(ValueError, match="1 values for 2"):
        reward_funcs.parse_reward_funcs(["gold", "format"], [1.0])
    assert reward_funcs.required_fields(reward_funcs.gold_reward) == ["kind", "answer"]
    assert reward_funcs.required_fields(reward_funcs.length_penalty) == ["completion_length", "max_completion_length"]


def test_missing_field_error_names_the_function_and_the_field():
    sources = reward_funcs.parse_reward_funcs(["format", "gold"], [])
    rows = [{"prompt_ids": [1], "prompt_text": "What is 1 + 1?", "kind": "arith", "answer": 2},
            {"prompt_ids": [1], "prompt_text": "What is 2 + 2?", "kind": "arith"}]  # no 'answer'
    with pytest.raises(reward_funcs.MissingFieldError, match=r"reward function 'gold' needs the field 'answer', but prompt 1"):
        reward_funcs.check_fields(sources, rows)
    reward_funcs.check_fields(sources, rows[:1])  # complete rows pass; 'finished' comes from the rollout
    with pytest.raises(reward_funcs.MissingFieldError, match=r"'gsm8k' needs the field 'gold_answer'"):
        reward_funcs.compute_rewards(reward_funcs.parse_reward_funcs(["gsm8k"], []), ["q"], ["#### 4"], {"kind": ["arith"]})


@pytest.mark.parametrize("token, text", [("1,450", "1450"), ("-3.5", "-3.5"), (".5", ".5"), ("72.0", "72.0"),
                                          ("7", "7")])
def test_gold_answers_and_completions_read_numbers_with_one_grammar(token, text):
    """A number reads the same whether it ends a GSM8K solution (the gold answer) or a completion."""
    from minialign.data.formats import gsm8k_gold_answer
    assert gsm8k_gold_answer(f"so #### {token}") == text
    assert reward_funcs.extract_final_answer(f"work... #### {token}") == text
    assert reward_funcs.extract_final_answer(f"The answer is {token}") == text
    assert reward_funcs.gsm8k_reward(["q"], [f"#### {token}"], gold_answer=[gsm8k_gold_answer(f"#### {token}")]) == [1.0]
