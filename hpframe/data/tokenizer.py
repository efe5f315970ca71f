"""The tokenizer of a dataset: a Hugging Face model directory's, a local tokenizer.json, or a new BPE.

A model directory (what ``save_pretrained`` writes; the directory ``model.from_hf`` names) is used as
the model was trained: its ``tokenizer.json`` unchanged (no token is ever added, so ids match the
embedding rows), its end-of-sequence token from ``tokenizer_config.json`` (``eos_token``) or
``config.json`` (``eos_token_id``), and a beginning-of-sequence token before every document when
``tokenizer_config.json`` sets ``add_bos_token``. Its ``config.json`` ``vocab_size`` bounds the ids:
a tokenizer with more ids than the model has rows is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from hpframe.data.dataset import DataError

EOS = "<|endoftext|>"
"""The separator of tokenizers trained by hpframe (and added to a bare tokenizer.json that lacks an EOS)."""


@dataclass
class LoadedTokenizer:
    tok: Tokenizer
    eos_id: int
    bos_id: int | None
    source: str
    """What the tokenizer came from, for meta.json."""
    model_vocab_size: int | None = None
    """config.json vocab_size of a model directory (the embedding rows), else None."""

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """A byte-level BPE with ``vocab_size`` entries (256 bytes + merges + the end-of-text token)."""
    if vocab_size < 257:
        raise DataError(f"--vocab-size={vocab_size}: a byte-level BPE needs at least 257 entries (256 bytes + {EOS})")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text byte for byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _from_file(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers library raises its own exception for a malformed file
        raise DataError(f"{file}: not a tokenizer.json the `tokenizers` library can read ({err})") from None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tok: Tokenizer, text: str, where: str) -> int:
    tid = tok.token_to_id(text)
    if tid is None:
        raise DataError(f"{where}: token {text!r} is not in the tokenizer's vocabulary")
    return tid


def _model_eos(tok: Tokenizer, directory: Path, tok_cfg: dict, model_cfg: dict) -> int:
    text = _token_text(tok_cfg.get("eos_token"))
    if text is not None:
        return _token_id(tok, text, str(directory / "tokenizer_config.json"))
    for name in ("config.json", "generation_config.json"):
        cfg = model_cfg if name == "config.json" else _read_json(directory / name)
        value = cfg.get("eos_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    raise DataError(
        f"{directory}: no end-of-sequence token in tokenizer_config.json (eos_token) or config.json "
        "(eos_token_id); name one with --eos TOKEN"
    )


def load_model_tokenizer(directory: Path, eos: str | None = None) -> LoadedTokenizer:
    """The tokenizer of a Hugging Face model directory, exactly as the model uses it."""
    file = directory / "tokenizer.json"
    if not file.is_file():
        others = sorted(p.name for p in directory.glob("tokenizer*")) or ["none"]
        raise DataError(
            f"{directory}: no tokenizer.json (tokenizer files found: {', '.join(others)}); hpframe reads the "
            "`tokenizers` format that save_pretrained writes for fast tokenizers"
        )
    tok = _from_file(file)
    tok_cfg, model_cfg = _read_json(directory / "tokenizer_config.json"), _read_json(directory / "config.json")
    eos_id = _token_id(tok, eos, "--eos") if eos is not None else _model_eos(tok, directory, tok_cfg, model_cfg)
    bos_id = None
    if tok_cfg.get("add_bos_token") is True:
        bos_text = _token_text(tok_cfg.get("bos_token"))
        if bos_text is None:
            raise DataError(f"{directory / 'tokenizer_config.json'}: add_bos_token is true but bos_token is not set")
        bos_id = _token_id(tok, bos_text, str(directory / "tokenizer_config.json"))
    vocab = model_cfg.get("vocab_size")
    loaded = LoadedTokenizer(tok, eos_id, bos_id, str(directory.resolve()), vocab if isinstance(vocab, int) else None)
    if loaded.model_vocab_size is not None and loaded.vocab_size > loaded.model_vocab_size:
        raise DataError(
            f"{file}: the tokenizer has {loaded.vocab_size} ids, more than the model's vocab_size="
            f"{loaded.model_vocab_size} in {directory / 'config.json'}; its ids would index past the embedding"
        )
    return loaded


def load_tokenizer_file(file: Path, eos: str | None = None) -> LoadedTokenizer:
    """A bare tokenizer.json; its EOS is ``eos``, else hpframe's ``<|endoftext|>`` (added when absent)."""
    tok = _from_file(file)
    if eos is not None:
        return LoadedTokenizer(tok, _token_id(tok, eos, "--eos"), None, str(file.resolve()))
    if tok.token_to_id(EOS) is None:  # a foreign tokenizer without our separator: append it
        tok.add_special_tokens([EOS])
    return LoadedTokenizer(tok, tok.token_to_id(EOS), None, str(file.resolve()))


def load_tokenizer(path: Path, eos: str | None = None) -> LoadedTokenizer:
    """``path`` is a model directory (with tokenizer.json) or a tokenizer.json file."""
    if path.is_dir():
        return load_model_tokenizer(path, eos)
    if path.is_file():
        return load_tokenizer_file(path, eos)
    raise DataError(f"--tokenizer {str(path)!r} not found (a model directory with tokenizer.json, or a tokenizer.json)")
