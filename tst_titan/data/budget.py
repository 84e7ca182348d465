"""Data budget: will the run's data repeat?

A TST run reads s times the tokens per step in phase 1, so a dataset sized for the
baseline can silently loop. At startup the trainer compares the stream tokens the plan
consumes on each data-parallel rank with an estimate of that rank's share of the
dataset (map-style sources: mean tokens of a fixed sample of documents x documents per
rank), logs it, warns when data would repeat, and refuses in strict mode
(``data.strict_budget = true``). Streaming sources have no known size: nothing to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from tst_titan.schedule import Phase, TSTPlan

SAMPLE_DOCS = 64


@dataclass(frozen=True)
class Budget:
    phase1_tokens: int  # stream tokens one rank reads in the superposition phase
    phase2_tokens: int  # ... and in the next-token phase
    available_tokens: int | None  # estimated tokens in one rank's share of the data

    @property
    def consumed_tokens(self) -> int:
        return self.phase1_tokens + self.phase2_tokens

    @property
    def epochs(self) -> float | None:
        if not self.available_tokens:
            return None
        return self.consumed_tokens / self.available_tokens

    def describe(self) -> str:
        used = (
            f"data budget: {self.consumed_tokens:,} stream tokens per rank "
            f"(phase 1: {self.phase1_tokens:,}, phase 2: {self.phase2_tokens:,})"
        )
        if self.epochs is None:
            return used + " of a dataset of unknown size"
        return used + f" of about {self.available_tokens:,} available ({self.epochs:.2f} epochs)"


def tokens_per_phase(plan: TSTPlan, samples_per_step: int) -> tuple[int, int]:
    """Stream tokens one rank reads in phase 1 and in phase 2."""
    p1 = plan.switch_step * samples_per_step * plan.window_len(Phase.SUPERPOSITION)
    p2 = (plan.total_steps - plan.switch_step) * samples_per_step * plan.window_len(Phase.NEXT_TOKEN)
    return p1, p2


def consumed_tokens_per_rank(plan: TSTPlan, samples_per_step: int) -> int:
    return sum(tokens_per_phase(plan, samples_per_step))


def estimate_rank_tokens(source, tokenizer) -> int | None:
    """Tokens in one rank's share of a map-style source, from a fixed document sample
    (exact for a token store)."""
    if hasattr(source, "rank_tokens_per_epoch"):
        return source.rank_tokens_per_epoch()
    n = getattr(source, "num_documents", None)
    get = getattr(source, "get_document", None)
    if not n or get is None:
        return None
    step = max(1, n // SAMPLE_DOCS)
    idx = list(range(0, n, step))[:SAMPLE_DOCS]
    mean = sum(len(tokenizer.encode(get(i), add_bos=True, add_eos=True)) for i in idx) / len(idx)
    return int(mean * source.documents_per_rank)


def plan_budget(source, tokenizer, plan: TSTPlan, samples_per_step: int) -> Budget:
    p1, p2 = tokens_per_phase(plan, samples_per_step)
    return Budget(p1, p2, estimate_rank_tokens(source, tokenizer))
