"""The engine's grammar sampling (pick first, check, re-draw) on synthetic logits."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from llmserve.core.errors import InvalidRequestError
from llmserve.core.params import SamplingParams
from llmserve.engines.llamacpp.sampling import (
    GRAMMAR_SHORTLIST,
    SamplerChain,
    build_sampler_chain,
)
from tests.structured.oracle import GrammarOracle


@pytest.fixture
def chains(oracle: GrammarOracle) -> Iterator[list[SamplerChain]]:
    """Chains built here, freed after the test."""
    built: list[SamplerChain] = []
    yield built
    for chain in built:
        chain.free()


def chain_for(oracle: GrammarOracle, chains: list[SamplerChain], **params: object) -> SamplerChain:
    model = oracle.model
    grammar = params.pop("grammar", None)
    assert grammar is None or isinstance(grammar, str)
    sampling = SamplingParams(**params)  # type: ignore[arg-type]
    chain = build_sampler_chain(sampling, grammar, model.vocab, model.n_vocab, 2048, 7)
    chains.append(chain)
    return chain


def token(oracle: GrammarOracle, text: str) -> int:
    (found,) = oracle.model.tokenize(text, False)
    return found


def logits_favouring(oracle: GrammarOracle, ranking: list[int]) -> np.ndarray:
    """Logits where `ranking` are the likeliest tokens, in that order; the rest far behind."""
    row = np.full(oracle.model.n_vocab, -10.0, dtype=np.float32)
    row += np.linspace(0, 1, oracle.model.n_vocab, dtype=np.float32)  # no ties
    for place, tid in enumerate(ranking):
        row[tid] = 100.0 - place
    return row


def test_allowed_pick_is_kept(oracle: GrammarOracle, chains: list[SamplerChain]) -> None:
    chain = chain_for(oracle, chains, temperature=0.0, grammar='root ::= "yes" | "no"')
    yes = token(oracle, "yes")
    assert chain.sample_constrained(logits_favouring(oracle, [yes])) == yes
    assert chain.grammar_resamples == 0


def test_rejected_pick_is_redrawn_from_allowed_tokens(
    oracle: GrammarOracle, chains: list[SamplerChain]
) -> None:
    chain = chain_for(oracle, chains, temperature=0.0, grammar='root ::= "yes" | "no"')
    maybe, no = token(oracle, "maybe"), token(oracle, "no")
    assert chain.sample_constrained(logits_favouring(oracle, [maybe, no])) == no
    assert chain.grammar_resamples == 1


def test_allowed_token_outside_the_shortlist_is_found(
    oracle: GrammarOracle, chains: list[SamplerChain]
) -> None:
    chain = chain_for(oracle, chains, temperature=0.0, grammar='root ::= "no"')
    no = token(oracle, "no")
    crowd = [t for t in range(1000, 1000 + GRAMMAR_SHORTLIST + 10) if t != no]
    row = logits_favouring(oracle, crowd)
    row[no] = -5.0  # likelier than the bulk, far outside the shortlist
    assert chain.sample_constrained(row) == no


def test_seeded_sampling_respects_the_grammar(
    oracle: GrammarOracle, chains: list[SamplerChain]
) -> None:
    rng = np.random.default_rng(0)
    first_pieces = set()
    for seed in range(12):
        chain = chain_for(oracle, chains, temperature=1.0, seed=seed, grammar="root ::= [0-9]+")
        row = rng.normal(0, 3, oracle.model.n_vocab).astype(np.float32)
        piece = oracle.model.piece(chain.sample_constrained(row))
        assert piece.isdigit(), piece
        first_pieces.add(piece)
    assert len(first_pieces) > 1


def test_grammar_left_with_nothing_raises_instead_of_aborting(
    oracle: GrammarOracle, chains: list[SamplerChain]
) -> None:
    y = token(oracle, "y")
    chain = chain_for(
        oracle, chains, temperature=0.0, grammar='root ::= "y"', banned_token_ids=(y,)
    )
    with pytest.raises(InvalidRequestError) as caught:
        chain.sample_constrained(logits_favouring(oracle, [y]))
    assert caught.value.param == "grammar"
