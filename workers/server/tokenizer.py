"""Text <-> token ids for /generate, from the checkpoint's tokenizer.json (when it ships one)."""

from __future__ import annotations

from pathlib import Path

from workers.errors import ConfigError


class TextCodec:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, model_path: str | Path) -> TextCodec | None:
        """The checkpoint's tokenizer, or None when it ships no tokenizer.json."""
        path = Path(model_path, "tokenizer.json")
        if not path.exists():
            return None
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise ConfigError(f"cannot load {path}: {e}") from e

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
