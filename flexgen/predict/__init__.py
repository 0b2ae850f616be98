"""A predict job from a config: the Lightning side of ``flexgen predict`` (and of ``batch_generate``).

* :mod:`~flexgen.predict.resolve` — config -> model, tokenizer, prompts, policy, plugins, job: every check
* :mod:`~flexgen.predict.run` — the run: the resolved plan -> Trainer.predict -> metrics
* :mod:`~flexgen.predict.summary` — the metrics JSON and the lines printed at the end
* :mod:`~flexgen.predict.plan` — the plan of a run, shown before it runs
* :mod:`~flexgen.predict.data` — prompt files, tokenisation, length-grouped blocks, the DataModule
* :mod:`~flexgen.predict.module` — the LightningModule: one ``predict_step`` = one block
* :mod:`~flexgen.predict.writer` — durable JSONL output, torn-line repair, resume scan, part files
* :mod:`~flexgen.predict.job` — the job fingerprint of an output, and the resume check
* :mod:`~flexgen.predict.distributed` — one run over several processes: rank 0 decides and merges
* :mod:`~flexgen.predict.callbacks` — progress bars with tokens/s, on stderr

It imports the config, the engine, the models and the planner, never the command line.
Nothing is imported here, so ``flexgen predict`` can report a config mistake before Lightning,
torch and transformers have loaded.
"""
