"""The built-in quickstart model: a tiny OPT written as a real HF checkpoint, built locally.

``model.path: builtin:quickstart`` resolves here. The point is a first run that needs no
download and still goes through exactly the code a real checkpoint does: an HF-format folder
(``config.json`` + ``model.safetensors``) read by the engine's checkpoint loader, and a tokenizer
that ``transformers.AutoTokenizer.from_pretrained`` loads, so text prompts work.

How it is made (once per cache folder, in a few seconds on two cores):

* a byte-level BPE tokenizer trained with the ``tokenizers`` library on the bundled
  ``quickstart_corpus.txt``, with OPT's special tokens at OPT's ids (``<s>`` 0, ``<pad>`` 1,
  ``</s>`` 2, ``<unk>`` 3) and ``</s>`` prepended to every prompt, as OPT's tokenizer does;
* ``transformers.OPTForCausalLM`` of a tiny shape (hidden 64, 2 layers) with seeded weights,
  trained for a few hundred steps on the same corpus so that its greedy continuations read
  like the corpus rather than noise. ``vocab_size`` is the tokenizer's, so every id is valid.

Where: ``$FLEXGEN_CACHE/quickstart-v1``, ``$FLEXGEN_CACHE`` defaulting to ``~/.cache/flexgen``.
It is built in a temporary sibling folder and renamed into place, so a crash or two concurrent
first runs never leave a half-written checkpoint under the real name; a finished folder is never
rewritten. The temporary folder is owned through a lock file (:mod:`flexgen.scratch`), so the
next run removes one a killed build left behind.
Bump :data:`VERSION` whenever what is built changes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flexgen.paths import cache_root

log = logging.getLogger(__name__)

VERSION = 1
CORPUS = Path(__file__).with_name("quickstart_corpus.txt")
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>"]  # OPT's ids 0, 1, 2, 3
VOCAB_SIZE = 512
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, max_position_embeddings=512)
TRAIN_STEPS = 300
SEED = 0

#: the names ``model.path: builtin:<name>`` accepts
BUILTINS = ("quickstart",)


def resolve_builtin(name: str, root: Path | None = None) -> Path:
    """The checkpoint folder of a built-in model, building it on first use."""
    if name not in BUILTINS:
        from flexgen.errors import ConfigError

        raise ConfigError(f"model.path: unknown built-in model {name!r}; built-ins: {', '.join(BUILTINS)}")
    return ensure_quickstart(root)


def ensure_quickstart(root: Path | None = None) -> Path:
    """Return the quickstart checkpoint folder, building it atomically if it is not there yet.

    The build happens in a folder this process owns (:class:`flexgen.scratch.OwnedFolder`),
    renamed into place when done. Half-built folders of runs that were killed are removed
    first; those of builds still running are left alone.
    """
    from flexgen.scratch import OwnedFolder, sweep

    root = Path(root) if root is not None else cache_root()
    target = root / f"quickstart-v{VERSION}"
    prefix = f".quickstart-v{VERSION}."
    sweep(root, prefix)
    if (target / "config.json").is_file():
        return target
    build = OwnedFolder(root, prefix)
    try:
        tmp = build.path
    except OSError as exc:
        from flexgen.errors import ConfigError

        raise ConfigError(
            f"model.path: cannot build the quickstart checkpoint in {root} ({exc.strerror or exc}); "
            "set FLEXGEN_CACHE to a writable folder"
        ) from exc
    try:
        log.info("building the quickstart checkpoint in %s (once)", target)
        build_quickstart(tmp)
        try:
            build.keep(target.name)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        build.release()  # a no-op once kept
    return target


def build_tokenizer():
    """A byte-level BPE trained on the bundled corpus, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.read_text(encoding="utf-8").splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def build_model(tokenizer, steps: int = TRAIN_STEPS):
    """A tiny seeded OPT, briefly trained on the corpus (deterministic for a given torch build)."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(SEED)
    config = OPTConfig(
        vocab_size=len(tokenizer), word_embed_proj_dim=SHAPE["hidden_size"], pad_token_id=1, bos_token_id=2,
        eos_token_id=2, dropout=0.0, attention_dropout=0.0, **SHAPE,
    )
    model = OPTForCausalLM(config)
    if steps:
        ids = [i for line in CORPUS.read_text(encoding="utf-8").splitlines() if line
               for i in tokenizer(line)["input_ids"] + [2]]
        data = torch.tensor(ids)
        seq, batch = 64, 16
        generator = torch.Generator().manual_seed(SEED)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=generator)
            x = torch.stack([data[s : s + seq] for s in starts])
            loss = model(input_ids=x, labels=x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        log.info("quickstart model trained for %d steps, final loss %.3f", steps, loss.item())
    return model


def build_quickstart(folder: Path, steps: int = TRAIN_STEPS) -> Path:
    """Write the quickstart checkpoint (model + tokenizer) into ``folder``."""
    import torch
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    # One thread: a model this small gains nothing from more, and on a busy machine extra
    # threads spin against each other (measured: 27 s with one thread, 160 s with two).
    torch.set_num_threads(1)
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, steps=steps)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        torch.set_num_threads(threads)
        hf_logging.enable_progress_bar()
    return folder
