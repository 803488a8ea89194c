"""Built-in synthetic tasks for the embedded default (no downloads), with checkable answers.

- `addition_preferences`: DPO pairs on small additions, `"a+b="` -> the right sum (chosen)
  vs a wrong one (rejected). The right answer is checkable (`addition_is_correct`).
- `arithmetic_problems` + `arithmetic_reward`: a verifiable-reward task for GRPO/PPO: a
  prompt such as `"12+7="` and a reward of 1.0 when the completion starts with the right
  number, else 0.0.

Records come as the `engine/data.py` record types, so they go through the same tokenization
and packing as user data.
"""

from __future__ import annotations

import random
import re

from .data import PreferenceRecord

_PROMPT = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*$")
_ANSWER = re.compile(r"^\s*(-?\d+)")


def solve(prompt: str) -> int:
    """The right answer of an arithmetic prompt such as `"3+4="` (ValueError if malformed)."""
    match = _PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"prompt must look like 'a+b=', 'a-b=' or 'a*b=', got {prompt!r}")
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_reward(prompt: str, completion: str) -> float:
    """1.0 when the completion starts with the right number (anything after it is ignored),
    else 0.0. The verifiable reward of the arithmetic tasks."""
    match = _ANSWER.match(completion)
    return float(match is not None and int(match.group(1)) == solve(prompt))


def addition_is_correct(prompt: str, completion: str) -> bool:
    return arithmetic_reward(prompt, completion) == 1.0


def _wrong_answer(rng: random.Random, right: int) -> int:
    # Near misses (off by 1..3) as often as far ones: the pair then differs in a digit that
    # only the arithmetic decides, not in length alone.
    while True:
        wrong = right + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < 0.5 else rng.randint(0, 18)
        if wrong != right and wrong >= 0:
            return wrong


def addition_prompts(max_operand: int) -> list[str]:
    """Every `"a+b="` prompt with a, b in 0..max_operand, in order."""
    return [f"{a}+{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]


def held_out_addition_prompts(max_operand: int = 9, fraction: float = 0.2) -> set[str]:
    """A fixed set of `"a+b="` prompts never trained on, to evaluate generalization."""
    prompts = addition_prompts(max_operand)
    random.Random(12345).shuffle(prompts)
    return set(prompts[:max(1, int(fraction * len(prompts)))])


def addition_preferences(num_pairs: int, *, seed: int = 0, max_operand: int = 9,
                         exclude: set[str] | None = None,
                         only: set[str] | None = None) -> list[PreferenceRecord]:
    """`num_pairs` DPO records `"a+b="` -> chosen: the sum, rejected: a wrong number.

    Operands are drawn uniformly from `0..max_operand`. `exclude` skips those prompts and
    `only` keeps only those (to hold out evaluation prompts: `held_out_addition_prompts`).
    """
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = random.Random(seed)
    records = []
    for _ in range(100 * num_pairs):
        if len(records) == num_pairs:
            break
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt = f"{a}+{b}="
        if (exclude and prompt in exclude) or (only is not None and prompt not in only):
            continue
        records.append(PreferenceRecord(prompt, str(a + b), str(_wrong_answer(rng, a + b))))
    if len(records) < num_pairs:
        raise ValueError("exclude leaves too few prompts to draw from")
    return records


def arithmetic_problems(num_problems: int, *, seed: int = 0, max_operand: int = 20,
                        ops: str = "+-") -> list[dict]:
    """Verifiable-reward problems `{"prompt": "12+7=", "answer": 19}` for GRPO/PPO; score a
    completion with `arithmetic_reward(prompt, completion)`."""
    if num_problems < 1:
        raise ValueError(f"num_problems must be >= 1, got {num_problems}")
    if not ops or set(ops) - set("+-*"):
        raise ValueError(f"ops must be a non-empty string of '+', '-', '*', got {ops!r}")
    rng = random.Random(seed)
    problems = []
    for _ in range(num_problems):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        prompt = f"{a}{rng.choice(ops)}{b}="
        problems.append({"prompt": prompt, "answer": solve(prompt)})
    return problems
