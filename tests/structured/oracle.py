"""Does llama.cpp's grammar sampler accept a text? Answered without generating anything."""

from __future__ import annotations

import ctypes
import math
from typing import Any

import llama_cpp

from llmserve.engines.llamacpp.model import LlamaModel
from llmserve.models.defaults import default_model_path


class GrammarOracle:
    """Feeds texts, token by token, through llama.cpp's grammar sampler (default model vocab)."""

    def __init__(self) -> None:
        self.model = LlamaModel.load(str(default_model_path()), 0, True, False)
        self.eos = int(llama_cpp.llama_vocab_eos(self.model.vocab))

    def parses(self, grammar: str) -> bool:
        """Whether llama.cpp parses the GBNF."""
        sampler = self._sampler(grammar)
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        return bool(sampler)

    def accepts(self, grammar: str, text: str) -> bool:
        """Whether `text` is a complete sentence of `grammar` (its tokens, then end of text)."""
        sampler = self._sampler(grammar)
        assert sampler, "the grammar does not parse"
        try:
            for token in self.model.tokenize(text, False):
                if not self._allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _sampler(self, grammar: str) -> Any:
        return llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")

    @staticmethod
    def _allowed(sampler: Any, token: int) -> bool:
        single = llama_cpp.llama_token_data(token, 1.0, 0.0)
        array = llama_cpp.llama_token_data_array(ctypes.pointer(single), 1, -1, False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        return bool(single.logit != -math.inf)

    def close(self) -> None:
        """Free the model."""
        self.model.free()
