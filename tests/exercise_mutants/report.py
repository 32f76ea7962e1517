"""The closing table of issue 22: each wrong answer the issue lists, its visible check, and the hidden points it
loses at the instructor seeds 0-3 (as graded: per-case points of exercises.scoring, each call under the
question's memory budget).

    python -m tests.exercise_mutants.report        (from the repository root)
    python tests/exercise_mutants/report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: import the corpus as a package, the repository's modules from the root
    sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
    from exercise_mutants.corpus import MUTANTS, SEEDS, exercise_of, hidden_units_lost, visible_message
else:
    from .corpus import MUTANTS, SEEDS, exercise_of, hidden_units_lost, visible_message

UNITS = 10_000
# The wrong answers of issue 22 ("Wrong answers the visible checks pass today"), plus the dense moe_forward
# masked with torch.where and the naive mla_absorbed: (question, words that name the corpus entry)
ISSUE_ANSWERS = [
    ("kv_bytes_per_token", "used the MHA/GQA formula for an MLA model"),
    ("kv_bytes_per_token", "left out MLA's shared RoPE key"),
    ("activated_params", "left out the noaux_tc router bias"),
    ("activated_params", "counted the output head although it is tied"),
    ("activated_params", "left out q_a_layernorm"),
    ("mla_latents", "ignored start_pos"),
    ("mla_absorbed", "the naive way (decompressed cache)"),
    ("route_topk", "left out routed_scaling_factor"),
    ("route_group_limited", "left out routed_scaling_factor"),
    ("moe_forward", "mistake: ran every expert on every token"),
    ("moe_forward", "every expert on every token, masked with torch.where"),
    ("update_bias", "moved the bias of an expert exactly at the mean load"),
    ("softmax_rows", "no column mask on the load"),
    ("softmax_rows", "no max subtracted"),
    ("softmax_rows", "masked lanes loaded as 0.0"),
    ("softmax_rows", "row stride BLOCK"),
    ("mla_decode_block", "no tail mask on the scores"),
    ("moe_forward", "every expert on every token"),  # the dense loop weighted by 0 (NaN at the dormant expert)
]


def selected() -> list[tuple[str, str, object]]:
    """(question, what is wrong, function) of each ISSUE_ANSWERS entry; raises LookupError for one missing."""
    rows = []
    for name, words in ISSUE_ANSWERS:
        exact = [(n, what, fn) for n, what, fn, _ in MUTANTS if n == name and what == words]
        found = exact + [(n, what, fn) for n, what, fn, _ in MUTANTS
                         if n == name and what.startswith("mistake: ") and words in what]
        if not found:
            raise LookupError(f"not in the mutant corpus: {name}: {words}")
        rows.append(found[0])
    return rows


def _points(units: int) -> str:
    return f"{units / UNITS:.2f}".rstrip("0").rstrip(".")


def row(name: str, what: str, fn) -> str:
    visible = "fail" if visible_message(name, fn) is not None else "**pass**"
    results = [hidden_units_lost(name, fn, seed) for seed in SEEDS]
    losing = [lost for lost, _ in results if lost]
    at_stake = results[0][1]
    low, high = (_points(min(losing)), _points(max(losing))) if losing else ("0", "0")
    amount = low if low == high else f"{low}-{high}"
    return (f"| {exercise_of(name)} | `{name}` | {what.removeprefix('mistake: ')} | {visible} | "
            f"lost {amount}/{_points(at_stake)} at {len(losing)}/{len(SEEDS)} seeds |")


def main() -> None:
    print(f"| exercise | question | wrong answer | visible check | hidden points lost (seeds {SEEDS[0]}-{SEEDS[-1]}) |")
    print("|---|---|---|---|---|")
    for name, what, fn in selected():
        print(row(name, what, fn), flush=True)


if __name__ == "__main__":
    main()
