"""The Lightning side of ``flexgen predict``.

* :mod:`~flexgen.predict.run` — the command: config -> model -> prompts -> policy -> Trainer.predict
* :mod:`~flexgen.predict.data` — prompt files, tokenisation, length-grouped blocks, the DataModule
* :mod:`~flexgen.predict.module` — the LightningModule: one ``predict_step`` = one block
* :mod:`~flexgen.predict.writer` — durable JSONL output, torn-line repair, resume scan, part files
* :mod:`~flexgen.predict.distributed` — one run over several processes: rank 0 decides and merges
* :mod:`~flexgen.predict.callbacks` — Lightning's progress bar with tokens/s
* :mod:`~flexgen.predict.quickstart` — the ``builtin:quickstart`` checkpoint, built locally

Nothing is imported here, so ``flexgen predict`` can report a config mistake before Lightning,
torch and transformers have loaded.
"""
